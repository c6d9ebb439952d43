import copy
import csv
import json
import math
import sys

import pytest
import torch

from hypernorm.engine import checkpoint as checkpoint_module
from hypernorm import create_model
from hypernorm.engine import evaluate_checkpoint, load_checkpoint, loop, lr_factor, train
from hypernorm.engine.loop import _Fit
from hypernorm.engine.trainer import METRIC_FIELDS
from hypernorm.nn import cpu_kernel
from tests.data.cifar_fixture import tiny_config


def test_one_epoch_trains_evaluates_and_writes_run_folder(cifar_root, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(cifar_root, out), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv", "relay.csv",
                                                     "summary.json"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == METRIC_FIELDS and len(rows) == 1 and rows[0]["epoch"] == "1"
    assert 0 <= float(rows[0]["test_top1_err"]) <= 100 and float(rows[0]["images_per_s"]) > 0
    on_disk = json.load(open(out / "summary.json"))
    assert on_disk == summary
    assert summary["done"] and summary["dataset"] == "cifar10" and summary["global_batch"] == 16
    assert summary["final"]["epoch"] == 1 and summary["best"]["epoch"] == 1
    assert summary["final"]["top1_err"] == pytest.approx(float(rows[0]["test_top1_err"]))
    # the checkpoint evaluates to the same test error
    result = evaluate_checkpoint(out)
    assert result["top1_err"] == pytest.approx(summary["final"]["top1_err"]) and result["count"] == 32
    # a finished run folder is not trained again
    assert train(tiny_config(cifar_root, out), quiet=True) == summary


@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "on_device"])
def test_kill_and_resume_equals_uninterrupted(cifar_root, tmp_path, monkeypatch, on_device):
    options = dict(model={"norm": "bhn"}, train={"epochs": 3, "deterministic": True},
                   optim={"warmup_epochs": 1, "label_smoothing": 0.1}, data={"on_device": on_device})
    train(tiny_config(cifar_root, tmp_path / "straight", **options), quiet=True)

    real_save, saves = _Fit._save, []

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the epoch-2 checkpoint

    monkeypatch.setattr(_Fit, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(cifar_root, tmp_path / "resumed", **options), quiet=True)
    monkeypatch.setattr(_Fit, "_save", real_save)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 2
    torch.manual_seed(1234)  # a fresh process would not share the killed one's RNG state
    train(tiny_config(cifar_root, tmp_path / "resumed", **options), quiet=True)

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    timing = ("epoch_time_s", "images_per_s")
    strip = [[{k: v for k, v in row.items() if k not in timing} for row in s["history"]] for s in (a, b)]
    assert strip[0] == strip[1] and len(strip[0]) == 3


def test_resume_refuses_a_different_run(cifar_root, tmp_path):
    train(tiny_config(cifar_root, tmp_path / "run"), quiet=True)
    with pytest.raises(ValueError, match=r"different run.*model.norm: 'bn' -> 'bhn'"):
        train(tiny_config(cifar_root, tmp_path / "run", model={"norm": "bhn"}), quiet=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint_module.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {"model": {}}})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {"model": {}}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt, truncated or not a hypernorm checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_micro_batch_two_trains_and_one_is_refused(cifar_root, tmp_path):
    config = tiny_config(cifar_root, tmp_path / "b2", model={"norm": "bhn"}, train={"batch_size": 2},
                         data={"train_subset": 8})
    summary = train(config, quiet=True)
    assert summary["done"] and summary["global_batch"] == 2 and math.isfinite(summary["final"]["top1_err"])
    with pytest.raises(ValueError, match="train.batch_size=1.*batch norm needs at least 2"):
        train(tiny_config(cifar_root, tmp_path / "b1", train={"batch_size": 1}), quiet=True)


def test_lr_schedules_with_warmup():
    optim = {"lr": 0.1, "warmup_epochs": 1, "warmup_start_factor": 0.1, "sched": "step", "milestones": [2, 3],
             "gamma": 0.1, "min_lr": 0.0}
    factors = [lr_factor(it, 10, optim, 4) for it in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[5] == pytest.approx(0.55)
    assert factors[10] == factors[19] == 1.0 and factors[20] == pytest.approx(0.1) and factors[30] == pytest.approx(0.01)
    cosine = dict(optim, sched="cosine", warmup_epochs=0, min_lr=0.01)
    values = [lr_factor(it, 10, cosine, 4) for it in range(41)]
    assert values[0] == 1.0 and values[20] == pytest.approx(0.55) and values[40] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_partial_config_dict_gets_defaults_and_unknown_keys_fail(cifar_root, tmp_path):
    config = copy.deepcopy(tiny_config(cifar_root, tmp_path / "run"))
    config["optim"]["learning_rate"] = 0.1
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        train(config, quiet=True)


def test_compile_null_compiles_only_hypernorm_networks_in_long_single_process_runs(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")  # where compiling was measured
    monkeypatch.setattr(loop, "compiler_refusal", lambda device: None)
    cpu, least = torch.device("cpu"), loop.AUTO_COMPILE_MIN_STEPS["cpu"]
    bn, bhn = create_model("resnet20", "bn"), create_model("resnet20", "bhn")
    refusal = loop.auto_compile_refusal
    assert refusal(bhn, cpu, least, False, False) is None
    assert "no HyperNorm layer" in refusal(bn, cpu, 10 * least, False, False)
    assert f"{least - 1:,} training steps, fewer than the {least:,}" in refusal(bhn, cpu, least - 1, False, False)
    assert "several processes" in refusal(bhn, cpu, least, True, False)
    assert "cuda_graphs" in refusal(bhn, torch.device("cuda"), 10**6, False, True)
    assert "not linux mps" in refusal(bhn, torch.device("mps"), 10**6, False, False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert "not win32 cpu" in refusal(bhn, cpu, least, False, False)


def test_compiler_refusal_says_why_in_one_line(monkeypatch):
    assert loop.compiler_refusal(torch.device("cpu")) is None  # this machine compiles (the compile tests need it)

    def broken(fn, **kwargs):
        raise RuntimeError("C++ compile error\nCommand: g++ ... (a page of compiler output)")

    monkeypatch.setattr(torch, "compile", broken)
    why = loop.compiler_refusal(torch.device("cpu"))
    assert why == "torch.compile failed on a one-line kernel (RuntimeError: C++ compile error)"


@pytest.mark.parametrize("compiler_works", [True, False])
def test_compile_null_trains_a_long_hypernorm_run_compiled_or_eager_when_the_compiler_fails(
        cifar_root, tmp_path, monkeypatch, compiler_works):
    """The trainer's wiring: the decision reaches torch.compile and summary.json. The compile is stubbed (the
    real one takes minutes on a CPU; compiled training is checked against eager in tests/nn)."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(loop, "AUTO_COMPILE_MIN_STEPS", {"cpu": 1})
    compiled = []
    monkeypatch.setattr(loop, "compiler_refusal", lambda device: None if compiler_works else "no C++ compiler")
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    summary = train(tiny_config(cifar_root, tmp_path / "auto", model={"norm": "bhn"}), quiet=True)
    assert summary["compiled"] is compiler_works and len(compiled) == int(compiler_works)
    eager = train(tiny_config(cifar_root, tmp_path / "eager", model={"norm": "bhn"}, train={"compile": False}),
                  quiet=True)
    assert eager["compiled"] is False and eager["final"] == summary["final"]
    bn = train(tiny_config(cifar_root, tmp_path / "bn"), quiet=True)
    assert bn["compiled"] is False and len(compiled) == int(compiler_works)
    # which path the eager BHN layers took is recorded too (the C++ kernel where it builds); BN has none
    kernel = cpu_kernel.available()
    assert (summary["cpu_kernel"], eager["cpu_kernel"], bn["cpu_kernel"]) == (kernel and not compiler_works, kernel, False)
