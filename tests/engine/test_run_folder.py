"""The run folder tells the truth: one finished state, failed runs marked failed, resizes refused or recorded."""
import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from hypernorm.cli import main
from hypernorm.engine import RESUMABLE_DIFFERENCES, load_checkpoint, resolve_config, train
from hypernorm.engine.checkpoint import save_checkpoint
from hypernorm.engine.loop import TrainingDiverged, _Fit
from hypernorm.engine.trainer import Classification
from tests.data.cifar_fixture import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_finished_state_is_in_summary_and_checkpoint(cifar_root, tmp_path):
    summary = train(tiny_config(cifar_root, tmp_path / "run"), quiet=True)
    state = load_checkpoint(tmp_path / "run")
    assert summary["status"] == state["status"] == "done" and summary["done"] and state["done"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "done"


def test_kill_between_checkpoint_and_summary_is_repaired(cifar_root, tmp_path, monkeypatch):
    """The final checkpoint is written, then the process dies before summary.json says done."""
    out = tmp_path / "run"
    config = tiny_config(cifar_root, out, train={"epochs": 2})
    real_write, calls = _Fit._write_files, []

    def die_on_the_last_files(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(_Fit, "_write_files", die_on_the_last_files)
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True)
    monkeypatch.setattr(_Fit, "_write_files", real_write)
    assert load_checkpoint(out)["status"] == "done"
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # the files disagree

    summary = train(config, quiet=True)  # repaired from the checkpoint, not trained again
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and on_disk["status"] == "done" and on_disk["epochs_done"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_diverged_run_is_marked_failed_and_never_done(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    config = tiny_config(cifar_root, out, train={"epochs": 3}, optim={"lr": 1e6, "sched": "step",
                                                                       "milestones": []})
    with pytest.raises(TrainingDiverged,
                       match=r"non-finite train loss \(nan\) in epoch 1 \(iteration \d\): training diverged"):
        train(config, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and not summary["done"] and "non-finite" in summary["reason"]
    assert summary["epochs_done"] == 1
    # a rerun does not train it again, nor call it done
    with pytest.raises(ValueError, match=r"failed \(non-finite train loss"):
        train(config, quiet=True)
    # the command line: one line, non-zero exit
    argv = ["train", "--quiet", "model.name=resnet20", "data.dataset=cifar10", f"data.root={cifar_root}",
            "data.workers=0", "data.download=false", "train.epochs=2", "train.batch_size=16", "train.device=cpu",
            "train.threads=1", "optim.lr=1e6", "optim.sched=cosine", f"output.dir={tmp_path / 'cli'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "non-finite train loss" in err and "Traceback" not in err


def test_non_finite_test_loss_fails_the_run(cifar_root, tmp_path, monkeypatch):
    real_evaluate = Classification.evaluate

    def nan_loss(self, *args):
        return {**real_evaluate(self, *args), "test_loss": float("nan")}

    monkeypatch.setattr(Classification, "evaluate", nan_loss)
    with pytest.raises(TrainingDiverged, match="non-finite test loss"):
        train(tiny_config(cifar_root, tmp_path / "run"), quiet=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["final"] is None and summary["best"] is None
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 2  # the epoch's row kept, to inspect


def test_resume_with_another_world_size_or_batch_is_refused_unless_allowed(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(cifar_root, out, train={"epochs": 2}), quiet=True)
    # make it the epoch-1 checkpoint of a 2-process run (2 x 16 = global batch 32)
    state = load_checkpoint(out)
    state.update(epoch=1, status="running", done=False, world_size=2, global_batch=32, history=state["history"][:1])
    save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(ValueError, match=r"trained with 2 process\(es\), global batch 32; this resume has 1 "
                                         r"process\(es\), global batch 16.*train.allow_resize=true"):
        train(tiny_config(cifar_root, out, train={"epochs": 2}), quiet=True)
    # a different per-process batch is a different run unless resizing is allowed
    with pytest.raises(ValueError, match="train.batch_size: 16 -> 8"):
        train(tiny_config(cifar_root, out, train={"epochs": 2, "batch_size": 8}), quiet=True)
    summary = train(tiny_config(cifar_root, out, train={"epochs": 2, "batch_size": 8, "allow_resize": True}),
                    quiet=True)
    assert summary["status"] == "done" and summary["global_batch"] == 8
    assert summary["resized"] == [{"after_epoch": 1, "from": "2 process(es), global batch 32",
                                   "to": "1 process(es), global batch 8"}]
    # the cosine schedule continues at epoch 2 of 2 in the new iteration count: halfway, not back at the start
    lr = load_checkpoint(out)["history"][1]["lr"]
    assert lr == pytest.approx(0.05 * 0.5)  # without realignment: 0.0427 (a quarter of the way)


def test_run_folder_files_are_readable_by_others(cifar_root, tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_config(cifar_root, tmp_path / "run"), quiet=True)
    finally:
        os.umask(old)
    for path in (tmp_path / "run").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_truncated_or_foreign_checkpoint_is_one_line(cifar_root, tmp_path, capsys):
    train(tiny_config(cifar_root, tmp_path / "run"), quiet=True)
    data = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert "is corrupt, truncated or not a hypernorm checkpoint" in err and len(err.strip().splitlines()) == 1
    torch.save({"model": {}, "config": {}, "task": "detection"}, tmp_path / "det.pt")
    assert main(["eval", str(tmp_path / "det.pt")]) == 2
    assert "holds a detection run; evaluate it with hypernorm detect-eval" in capsys.readouterr().err
    # training into a folder whose checkpoint is truncated: refused, not started over
    with pytest.raises(ValueError, match="truncated"):
        train(tiny_config(cifar_root, tmp_path / "cut"), quiet=True)


def test_bad_values_fail_before_anything_is_written(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--quiet", "data.dataset=cifar10", f"data.root={cifar_root}", "data.download=false",
            "train.device=cpu", "train.threads=1", f"output.dir={out}"]
    for bad, message in [("optim.lr=0", "'optim.lr' expects a positive learning rate"),
                         ("model.num_classes=5", "'model.num_classes' expects at least the 10 classes of cifar10"),
                         ("data.train_subset=ten", "'data.train_subset' expects a positive int or null")]:
        assert main(base + [bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()


def test_runner_interface():
    """What the runner imports: the keys a resumed run may change, and the config train() really uses."""
    assert "data.root" in RESUMABLE_DIFFERENCES and "optim.lr" not in RESUMABLE_DIFFERENCES
    resolved = resolve_config({"train": {"epochs": 3}, "optim": {"sched": "cosine"}})
    assert resolved["train"]["epochs"] == 3 and resolved["model"]["name"] == "resnet20"


@pytest.mark.parametrize("module", ["hypernorm/engine/cli.py", "hypernorm/detection/cli.py",
                                    "hypernorm/engine/schema.py", "hypernorm/detection/schema.py",
                                    "hypernorm/config.py", "hypernorm/engine/__init__.py",
                                    "hypernorm/detection/__init__.py"])
def test_command_modules_import_no_torch_at_top_level(module):
    """--help builds every subcommand's parser: the modules it loads import torch only inside the commands."""
    tree = ast.parse((REPO / module).read_text())
    imported = []
    for node in tree.body:  # top level only
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(("." * node.level) + (node.module or ""))
    heavy = [name for name in imported if name.split(".")[0] in ("torch", "torchvision", "numpy", "pycocotools")
             or name.lstrip(".") in ("trainer", "loop", "engine", "data", "model", "evaluate", "models", "nn")]
    assert not heavy, heavy
