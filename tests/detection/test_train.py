import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hypernorm import cli
from hypernorm.detection import TABLE2_PAIRS
from hypernorm.detection.engine import Detection, train
from hypernorm.detection.evaluate import METRICS
from hypernorm.detection.schema import load_detection_config
from hypernorm.engine import load_checkpoint

from .conftest import tiny_config_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backbone_norm, neck_norm", TABLE2_PAIRS)
def test_every_table2_pair_trains_and_evaluates(tiny_coco, tmp_path, backbone_norm, neck_norm):
    cfg = load_detection_config(None, tiny_config_overrides(*tiny_coco, str(tmp_path / "run")) + [
        f"model.backbone_norm={backbone_norm}", f"model.neck_norm={neck_norm}"])
    summary = train(cfg, quiet=True)
    assert summary["iterations_done"] == 2 and summary["status"] == "done"
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    final = summary["final"]
    # COCOeval ran on the detections: every metric is a fraction (-1 only where no box has that size).
    for name in METRICS:
        assert -1.0 <= final[name] <= 1.0
    assert final["AP50"] >= final["AP75"] and final["APl"] == -1.0  # no box over 96^2 px in the fixture
    # the run folder of classification: config, metrics.csv, summary.json, checkpoint.pt
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv",
                                                                    "summary.json"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_resnet50_bhn_pair_trains(tiny_coco, tmp_path):
    """The paper's network itself, BHN in backbone and neck/head, at 64 px."""
    cfg = load_detection_config(None, tiny_config_overrides(*tiny_coco, str(tmp_path / "run")) + [
        "model.arch=resnet50", "model.backbone_norm=bhn", "model.neck_norm=bhn", "train.eval=false"])
    summary = train(cfg, quiet=True)
    assert math.isfinite(summary["train_loss"]) and summary["final"] is None
    state = load_checkpoint(tmp_path / "run")["model"]
    assert "backbone.fpn.layer_blocks.3.1.relay.cell.input_map.0.weight" in state  # the neck's relay owner


def test_cli_train_refuses_a_changed_rerun_and_evaluates(tiny_coco, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_config_overrides(*tiny_coco, str(out)) + ["model.backbone_norm=bhn", "model.neck_norm=gn",
                                                          "train.eval=false", "train.grad_clip=1.0"]
    assert cli.main(["detect-train", "--quiet"] + args) == 0
    first = load_checkpoint(out)
    assert (first["epoch"], first["iteration"], first["status"]) == (1, 2, "done")
    # rerunning the finished run does nothing; rerunning with another config is refused, never started over
    assert cli.main(["detect-train", "--quiet"] + args) == 0
    assert cli.main(["detect-train", "--quiet"] + args + ["train.epochs=2", "train.max_iters=4"]) == 2
    assert "holds a different run (train.epochs: 1 -> 2, train.max_iters: 2 -> 4)" in capsys.readouterr().err
    assert torch.equal(load_checkpoint(out)["model"]["roi_heads.box_predictor.cls_score.weight"],
                       first["model"]["roi_heads.box_predictor.cls_score.weight"])
    assert cli.main(["detect-eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split() == ["Backbone", "Neck/Head", *METRICS]
    assert table[-1].split()[:2] == ["BHN", "GN"] and len(table[-1].split()) == 8


def test_killed_mid_epoch_resumes_bit_for_bit(tiny_coco, tmp_path, monkeypatch):
    """3 epochs of 2 iterations straight, against a run killed in its 4th iteration (mid epoch 2) and rerun."""
    def config(out):
        return load_detection_config(None, tiny_config_overrides(*tiny_coco, str(out)) + [
            "model.backbone_norm=bn", "model.neck_norm=gn", "train.epochs=3", "train.max_iters=null",
            "train.eval=false", "optim.warmup_iters=3", "optim.milestones=[2]"])

    straight = train(config(tmp_path / "straight"), quiet=True)
    real_step, steps = Detection.train_step, []

    def step_then_die(self, *args):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Detection, "train_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed"), quiet=True)
    monkeypatch.setattr(Detection, "train_step", real_step)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 1
    torch.manual_seed(1234)  # a fresh process would not share the killed one's RNG state
    resumed = train(config(tmp_path / "resumed"), quiet=True)

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["iteration"] == b["iteration"] == 6 and straight["status"] == resumed["status"] == "done"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_old_key_names_work_with_a_deprecation_message(tiny_coco, tmp_path):
    new = load_detection_config(None, tiny_config_overrides(*tiny_coco, str(tmp_path / "run")))
    old_names = [item.replace("optim.lr=", "train.lr=").replace("output.dir=", "train.output=")
                 for item in tiny_config_overrides(*tiny_coco, str(tmp_path / "run"))]
    with pytest.warns(FutureWarning, match=r"'train.output' is deprecated; use 'output.dir'"):
        old = load_detection_config(None, old_names + ["train.clip_grad_norm=1.0", "train.resume=true"])
    assert old == {**new, "train": {**new["train"], "grad_clip": 1.0}}
    (tmp_path / "old.yaml").write_text("train:\n  warmup_factor: 0.01\n  output: runs/x\n")
    with pytest.warns(FutureWarning, match="'train.warmup_factor' is deprecated; use 'optim.warmup_start_factor'"):
        from_file = load_detection_config(tmp_path / "old.yaml")
    assert from_file["optim"]["warmup_start_factor"] == 0.01 and from_file["output"]["dir"] == "runs/x"


def test_old_run_folder_and_foreign_or_truncated_checkpoints_are_refused(tiny_coco, tmp_path, capsys):
    args = tiny_config_overrides(*tiny_coco, str(tmp_path / "old"))
    (tmp_path / "old").mkdir()
    torch.save({"model": {}, "epoch": 0}, tmp_path / "old" / "last.pth")
    assert cli.main(["detect-train", "--quiet"] + args) == 2
    assert "holds last.pth of an older release" in capsys.readouterr().err
    torch.save({"model": {}, "config": {}, "task": "classification"}, tmp_path / "cls.pt")
    assert cli.main(["detect-eval", "--checkpoint", str(tmp_path / "cls.pt")]) == 2
    assert "holds a classification run; evaluate it with hypernorm eval" in capsys.readouterr().err
    data = (tmp_path / "cls.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert cli.main(["detect-eval", "--checkpoint", str(tmp_path / "cut.pt")]) == 2
    err = capsys.readouterr().err
    assert "cut.pt' is corrupt, truncated or not a hypernorm checkpoint" in err and "Traceback" not in err


def test_cli_reports_bad_config_key(capsys):
    assert cli.main(["detect-train", "train.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epochz'; valid keys: model.backbone_norm, " in err and "train.epochs" in err
    assert cli.main(["detect-train", "-c", os.path.join(ROOT, "configs", "detection", "coco128_smoke.yaml"),
                     "model.kwargs.box_score_thresh=0.1"]) == 2
    assert "model.kwargs={box_score_thresh: ...}" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("data.hflip=2", "'data.hflip' expects a probability in [0, 1], got 2"),
    ("model.arch=resnet7", "'model.arch' expects one of resnet18, resnet34, resnet50, resnet101"),
    ("model.backbone_norm=none", "'model.backbone_norm' expects one of frozenbn, bn,"),
    ("model.trainable_backbone_layers=6", "'model.trainable_backbone_layers' expects an int in 0..5 or null"),
    ("model.max_size=10", "'model.max_size' expects at least model.min_size=800"),
    ("train.max_iters=0", "'train.max_iters' expects a positive int or null"),
    ("optim.milestones=[8, 12]", "'optim.milestones' expects epochs before the last (train.epochs=12)"),
    ("optim.lr_batch=0", "'optim.lr_batch' expects a positive int"),
])
def test_cli_bad_values_are_one_line_before_anything_is_written(override, message, tmp_path, capsys):
    assert cli.main(["detect-train", f"output.dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unknown_torchvision_argument_is_one_line(tiny_coco, tmp_path, capsys):
    args = tiny_config_overrides(*tiny_coco, str(tmp_path / "run")) + ["model.kwargs={box_nms: 0.5}"]
    assert cli.main(["detect-train", "--quiet"] + args) == 2
    err = capsys.readouterr().err
    # torchvision would swallow the key silently (its transform takes **kwargs)
    assert "'model.kwargs' expects arguments of torchvision's FasterRCNN (" in err and "box_nms_thresh" in err
    assert err.strip().endswith("got box_nms")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_cli_renamed_keys_warn_in_one_line(tmp_path, capsys):
    assert cli.main(["detect-train", f"train.output={tmp_path / 'run'}", f"data.root={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"hypernorm detect-train: warning: override 'train.output={tmp_path / 'run'}': config key "
                      f"'train.output' is deprecated; use 'output.dir' (the old name is refused from the next release)")
    assert "does not exist" in err[1] and not (tmp_path / "run").exists()


def test_torchrun_ddp_two_processes(tiny_coco, tmp_path):
    """2-process gloo DDP on CPU: DistributedSampler shards, DDP syncs, evaluation gathers both shards. SyncBHN
    everywhere: HyperNorm relays in backbone, neck and head, and the SyncBN standardizers run as the engine's
    CPUSyncBatchNorm (torch's SyncBatchNorm is refused by DDP on CPU)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hypernorm.cli", "detect-train"] + tiny_config_overrides(*tiny_coco, str(out)) + [
        "train.batch_size=1", "model.backbone_norm=syncbhn", "model.neck_norm=syncbhn"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations_done"] == 2 and summary["status"] == "done"
    assert all(-1.0 <= summary["final"][m] <= 1.0 for m in METRICS)
    state = load_checkpoint(out)["model"]
    assert "backbone.fpn.layer_blocks.3.1.relay.cell.input_map.0.weight" in state  # the neck's relay owner
    assert "roi_heads.box_head.0.1.norm.running_mean" in state  # the standardizer keeps SyncBatchNorm's keys


def test_configs_cover_every_table2_row_with_the_1x_schedule():
    config_dir = os.path.join(ROOT, "configs", "detection")
    pairs = set()
    for name in os.listdir(config_dir):
        if not name.startswith("faster_rcnn_r50_fpn_1x_"):
            continue
        cfg = load_detection_config(os.path.join(config_dir, name))
        backbone_norm, neck_norm = name[len("faster_rcnn_r50_fpn_1x_"):-len(".yaml")].split("_")
        assert (cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"]) == (backbone_norm, neck_norm)
        assert cfg["model"]["arch"] == "resnet50" and cfg["model"]["min_size"] == 800
        assert cfg["train"]["epochs"] == 12 and cfg["optim"]["milestones"] == [8, 11] and cfg["optim"]["lr"] == 0.02
        assert cfg["output"]["dir"].endswith(name[:-len(".yaml")])
        pairs.add((backbone_norm, neck_norm))
    assert pairs == set(TABLE2_PAIRS)
