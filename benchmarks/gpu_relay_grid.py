"""Run configs/experiments/cifar_relay_gpu.yaml on one GPU inside a fixed time: the longest He et al. schedule
that fits, up to its 164 epochs.

1. Calibrate: the grid's 8 runs side by side on the GPU, 2 epochs of a 7,680-image subset each, into a scratch
   folder (never reported). Epoch 2 gives each run's training images/s with all 8 sharing the GPU, and its test
   pass time.
2. E = the epochs the slowest run finishes in the time left (capped at 164); the step milestones sit at the
   schedule's fractions (81/164, 122/164).
3. The grid with train.epochs=E into ``<out>/cifar_relay_gpu_e<E>``, stopped at the deadline if it overruns
   (a run not finished stays ``running`` in its folder, and ``hypernorm report`` lists it apart).

    python benchmarks/gpu_relay_grid.py --data-root DIR --out DIR --budget-s 420 [--workers 8]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRID = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cifar_relay_gpu.yaml"
HE_EPOCHS, HE_MILESTONES = 164, (81, 122)
TRAIN_IMAGES, CALIBRATION_IMAGES = 50_000, 7_680
STARTUP_S = 25  # per grid: worker processes start, load the data, capture their graphs
# The calibration's short epochs ran 1.24x faster than the grid's (H200, 8 runs: BHN 6.05 s estimated, 7.5 s
# measured), which left the BHN runs 4-5 epochs short of 43 at the deadline.
SAFETY = 1.35


def experiment(overrides: list[str], output_dir: Path, workers: int, timeout: float, log: Path) -> int | None:
    """``hypernorm experiment`` on the grid; None when stopped at ``timeout`` (its whole process group)."""
    command = [sys.executable, "-m", "hypernorm.cli", "experiment", "-c", str(GRID), "--workers", str(workers),
               "--output-dir", str(output_dir), *overrides]
    print("$", " ".join(command), flush=True)
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None


def epoch_seconds(run_dir: Path, calibration_images: int, train_images: int) -> float:
    """An epoch's time estimated from a calibration run's second epoch: the grid's training images at its rate
    plus its test pass."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    last = rows[-1]
    rate, total = float(last["images_per_s"]), float(last["epoch_time_s"])
    return train_images / rate + max(0.0, total - calibration_images / rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding cifar10.npz (or the official archive)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget-s", required=True, type=float, help="seconds for calibration and grid together")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=HE_EPOCHS)
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                        help="training images per epoch of the grid (50,000: CIFAR's whole train set)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. to try the "
                        "script on a CPU: train.device=cpu train.cuda_graphs=false)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "grid.log"
    data = [f"data.dataset={args.dataset}", f"data.root={args.data_root}", *args.overrides]

    scratch = args.out / "calibration"
    start = time.monotonic()
    code = experiment(data + [f"data.train_subset={args.calibration_images}", "train.epochs=2", "optim.milestones=[1]"],
                      scratch, args.workers, deadline - time.monotonic(), log)
    calibration_s = time.monotonic() - start
    runs = sorted(p for p in scratch.iterdir() if (p / "metrics.csv").is_file()) if scratch.is_dir() else []
    if code is None or not runs:
        print(f"calibration did not finish (exit {code}); see {log}", flush=True)
        return 1
    per_epoch = {p.name: epoch_seconds(p, args.calibration_images, args.train_images) for p in runs}
    slowest = max(per_epoch.values())
    left = deadline - time.monotonic() - STARTUP_S
    epochs = min(args.max_epochs, math.floor(left / (slowest * SAFETY)))
    info = {"calibration_s": calibration_s, "epoch_s_estimate": per_epoch, "budget_s": args.budget_s,
            "epochs": epochs, "workers": args.workers}
    print(json.dumps(info, indent=1), flush=True)
    if epochs < 4:
        print("too little time for a grid of at least 4 epochs", flush=True)
        return 1
    milestones = [max(1, round(epochs * m / HE_EPOCHS)) for m in HE_MILESTONES]
    grid_dir = args.out / f"cifar_relay_gpu_e{epochs}"
    info["grid_dir"] = str(grid_dir)
    (args.out / "calibration.json").write_text(json.dumps(info, indent=1) + "\n")
    start = time.monotonic()
    code = experiment(data + [f"train.epochs={epochs}", f"optim.milestones=[{milestones[0]},{milestones[1]}]"],
                      grid_dir, args.workers, deadline - time.monotonic(), log)
    print(f"grid {'stopped at the deadline' if code is None else f'exit {code}'} after "
          f"{time.monotonic() - start:.0f} s: {grid_dir}", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
