import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hypernorm import cli
from hypernorm.detection import TABLE2_PAIRS
from hypernorm.config import load_config
from hypernorm.detection.engine import DEFAULT_DETECTION_CONFIG, train
from hypernorm.detection.evaluate import METRICS

from .conftest import tiny_config_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backbone_norm, neck_norm", TABLE2_PAIRS)
def test_every_table2_pair_trains_and_evaluates(tiny_coco, tmp_path, backbone_norm, neck_norm):
    cfg = load_config(None, tiny_config_overrides(*tiny_coco, str(tmp_path / "run")) + [
        f"model.backbone_norm={backbone_norm}", f"model.neck_norm={neck_norm}"], defaults=DEFAULT_DETECTION_CONFIG)
    summary = train(cfg)
    assert summary["iteration"] == 2
    assert math.isfinite(summary["loss"]) and summary["loss"] > 0
    # COCOeval ran on the detections: every metric is a fraction (-1 only where no box has that size).
    for name in METRICS:
        assert -1.0 <= summary[name] <= 1.0
    assert summary["AP50"] >= summary["AP75"] and summary["APl"] == -1.0  # no box over 96^2 px in the fixture
    lines = (tmp_path / "run" / "summary.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["AP"] == summary["AP"]
    assert (tmp_path / "run" / "last.pth").is_file()


def test_resnet50_bhn_pair_trains(tiny_coco, tmp_path):
    """The paper's network itself, BHN in backbone and neck/head, at 64 px."""
    cfg = load_config(None, tiny_config_overrides(*tiny_coco, str(tmp_path / "run")) + [
        "model.arch=resnet50", "model.backbone_norm=bhn", "model.neck_norm=bhn", "train.eval=false"],
        defaults=DEFAULT_DETECTION_CONFIG)
    summary = train(cfg)
    assert math.isfinite(summary["loss"]) and "AP" not in summary
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=False)["model"]
    assert "backbone.fpn.layer_blocks.3.1.relay.cell.input_map.0.weight" in state  # the neck's relay owner


def test_cli_train_resume_and_eval(tiny_coco, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_config_overrides(*tiny_coco, str(out)) + ["model.backbone_norm=bhn", "model.neck_norm=gn"]
    assert cli.main(["detect-train"] + args + ["train.eval=false", "train.clip_grad_norm=1.0"]) == 0
    first = torch.load(out / "last.pth", weights_only=False)
    # Resuming continues from the checkpoint: a second epoch, its iterations counted on.
    assert cli.main(["detect-train"] + args + ["train.eval=false", "train.resume=true", "train.epochs=2",
                                               "train.max_iters=4"]) == 0
    second = torch.load(out / "last.pth", weights_only=False)
    assert (first["epoch"], first["iteration"]) == (0, 2) and (second["epoch"], second["iteration"]) == (1, 4)
    capsys.readouterr()
    assert cli.main(["detect-eval", "--checkpoint", str(out / "last.pth")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split() == ["Backbone", "Neck/Head", *METRICS]
    assert table[-1].split()[:2] == ["BHN", "GN"] and len(table[-1].split()) == 8


def test_cli_reports_bad_config_key(capsys):
    assert cli.main(["detect-train", "train.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epochz'; valid keys: model.backbone_norm, " in err and "train.epochs" in err
    assert cli.main(["detect-train", "-c", os.path.join(ROOT, "configs", "detection", "coco128_smoke.yaml"),
                     "model.kwargs.box_score_thresh=0.1"]) == 2
    assert "model.kwargs={box_score_thresh: ...}" in capsys.readouterr().err


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
    summary = json.loads((out / "summary.jsonl").read_text().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["iteration"] == 2
    assert all(-1.0 <= summary[m] <= 1.0 for m in METRICS)
    state = torch.load(out / "last.pth", weights_only=False)["model"]
    assert "backbone.fpn.layer_blocks.3.1.relay.cell.input_map.0.weight" in state  # the neck's relay owner
    assert "roi_heads.box_head.0.1.norm.running_mean" in state  # the standardizer keeps SyncBatchNorm's keys


def test_configs_cover_every_table2_row_with_the_1x_schedule():
    config_dir = os.path.join(ROOT, "configs", "detection")
    pairs = set()
    for name in os.listdir(config_dir):
        if not name.startswith("faster_rcnn_r50_fpn_1x_"):
            continue
        cfg = load_config(os.path.join(config_dir, name), defaults=DEFAULT_DETECTION_CONFIG)
        backbone_norm, neck_norm = name[len("faster_rcnn_r50_fpn_1x_"):-len(".yaml")].split("_")
        assert (cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"]) == (backbone_norm, neck_norm)
        assert cfg["model"]["arch"] == "resnet50" and cfg["model"]["min_size"] == 800
        assert cfg["train"]["epochs"] == 12 and cfg["train"]["milestones"] == [8, 11] and cfg["train"]["lr"] == 0.02
        assert cfg["train"]["output"].endswith(name[:-len(".yaml")])
        pairs.add((backbone_norm, neck_norm))
    assert pairs == set(TABLE2_PAIRS)
