"""Tiny fake run folders in the layout the training engine writes, and a fake ``train`` that writes them."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import yaml


def write_run(root: Path, name: str, *, model="resnet20", norm="bn", batch=128, seed=0, final=10.0, best=9.0,
              top5=1.0, epochs=3, done=True, dataset="cifar10", status=None, reason=None, config=None) -> Path:
    """``config``: further config sections merged in (e.g. {"train": {"epochs": 5}})."""
    folder = root / name
    folder.mkdir(parents=True)
    full = {"model": {"name": model, "norm": norm}, "data": {"dataset": dataset},
            "train": {"batch_size": batch, "seed": seed, "epochs": epochs}}
    for section, values in (config or {}).items():
        full.setdefault(section, {}).update(values)
    (folder / "config.yaml").write_text(yaml.safe_dump(full))
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_top1_err", "test_top1_err"])
        writer.writeheader()
        for e in range(1, epochs + 1):
            writer.writerow({"epoch": e, "train_top1_err": final + 20 / e, "test_top1_err": final + 10 / e})
    summary = {"dataset": dataset, "global_batch": batch, "done": done, "epochs": epochs, "epochs_done": epochs,
               "final": {"top1_err": final, "top5_err": top5, "epoch": epochs},
               "best": {"top1_err": best, "top5_err": top5, "epoch": epochs - 1}}
    if status is not None:
        summary["status"] = status
    if reason is not None:
        summary["reason"] = reason
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class FakeTrain:
    """Writes what the engine writes (config.yaml, metrics.csv, summary.json) and appends one line per call to
    ``journal`` (with O_APPEND, so several processes can share it). Picklable: worker processes run it."""

    def __init__(self, journal: Path, fail_on: str | None = None, sleep: float = 0.0, die_on: str | None = None,
                 mark_failed_on: str | None = None):
        self.journal, self.fail_on, self.sleep = Path(journal), fail_on, sleep
        self.die_on, self.mark_failed_on = die_on, mark_failed_on

    def __call__(self, config: dict) -> dict:
        folder = Path(config["output"]["dir"])
        record = {"run": folder.name, "pid": os.getpid(), "threads": config["train"]["threads"],
                  "lr": config["optim"]["lr"], "batch": config["train"]["batch_size"]}
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.close(fd)
        print(f"fake training of {folder.name} with train.threads={config['train']['threads']}", flush=True)
        time.sleep(self.sleep)
        if self.die_on and self.die_on == folder.name:
            os._exit(3)  # a crash that no exception handler sees
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        if self.fail_on and self.fail_on == folder.name:
            raise FloatingPointError("training diverged in epoch 1 (loss nan)\nsecond line")
        status = "failed" if self.mark_failed_on == folder.name else "done"
        final = 10.0 + config["optim"]["lr"]
        summary = {"dataset": config["data"]["dataset"], "global_batch": config["train"]["batch_size"],
                   "status": status, "done": status == "done", "epochs": config["train"]["epochs"],
                   "epochs_done": 1, "final": {"top1_err": final, "top5_err": 1.0, "epoch": 1},
                   "best": {"top1_err": final, "top5_err": 1.0, "epoch": 1}}
        if status == "failed":
            summary["reason"] = "non-finite test loss in epoch 1"
        with (folder / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "train_top1_err", "test_top1_err"])
            writer.writeheader()
            writer.writerow({"epoch": 1, "train_top1_err": final + 5, "test_top1_err": final})
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary


def race_grid(grid_path: str, journal: str, start, output: str) -> None:
    """One runner of the two-process lock test: wait for the start signal, then run the grid."""
    from hypernorm.analysis.runner import load_grid, run_grid

    start.wait()
    result = run_grid(load_grid(grid_path), FakeTrain(Path(journal), sleep=0.2))
    Path(output).write_text(json.dumps({"trained": result.trained, "passed_by": result.passed_by,
                                        "failures": result.failures}))
