"""Tiny fake run folders in the layout the training engine writes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml


def write_run(root: Path, name: str, *, model="resnet20", norm="bn", batch=128, seed=0, final=10.0, best=9.0,
              top5=1.0, epochs=3, done=True, dataset="cifar10") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config = {"model": {"name": model, "norm": norm}, "data": {"dataset": dataset},
              "train": {"batch_size": batch, "seed": seed}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_top1_err", "test_top1_err"])
        writer.writeheader()
        for e in range(1, epochs + 1):
            writer.writerow({"epoch": e, "train_top1_err": final + 20 / e, "test_top1_err": final + 10 / e})
    summary = {"dataset": dataset, "global_batch": batch, "done": done,
               "final": {"top1_err": final, "top5_err": top5, "epoch": epochs},
               "best": {"top1_err": best, "top5_err": top5, "epoch": epochs - 1}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder
