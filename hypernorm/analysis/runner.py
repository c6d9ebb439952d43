"""Experiment grids: many (model, norm, batch size, seed, ...) training runs from one YAML file, resumable.

A grid file::

    name: cifar_reduced
    base: ../cifar/reduced_resnet20.yaml      # training config, relative to this file
    output_dir: runs/cifar_reduced            # one folder per run below it
    overrides: [train.epochs=15]              # applied to every run
    grid:                                     # every combination is one run
      model.norm: [bn, bhn]
      train.batch_size: [128, 8, 2]
      seed: [0, 1, 2]
    lr_scaling: {reference_batch: 128}        # optional: lr *= batch / reference_batch (linear scaling rule)

Each run folder gets ``run.json`` (its grid coordinates) beside what the training engine writes. A run whose
``summary.json`` says ``done`` is not run again; an interrupted one resumes from its checkpoint. Several
``hypernorm experiment`` processes may work on one grid at once (e.g. one thread each on a small CPU): a run
being trained holds ``running.lock`` (its process id), and the others pass it by.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm.auto import tqdm

__all__ = ["Run", "load_grid", "expand_grid", "run_grid", "is_done"]

TrainFn = Callable[[dict], dict]
REQUIRED_KEYS = ("base", "output_dir", "grid")


@dataclass(frozen=True)
class Run:
    name: str
    folder: Path
    coords: dict[str, Any]  # grid key -> value
    overrides: list[str]  # key=value overrides for the base config, in order


def load_grid(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a grid file; relative ``base`` resolves against the file, ``overrides`` append to its own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment grid {str(path)!r} does not exist")
    grid = yaml.safe_load(path.read_text()) or {}
    missing = [key for key in REQUIRED_KEYS if key not in grid]
    if missing:
        raise ValueError(f"experiment grid {str(path)!r} lacks {', '.join(missing)} (needs {', '.join(REQUIRED_KEYS)})")
    if not isinstance(grid["grid"], dict) or not all(isinstance(v, list) and v for v in grid["grid"].values()):
        raise ValueError(f"experiment grid {str(path)!r}: 'grid' maps config keys to non-empty lists of values")
    grid["base"] = str((path.parent / grid["base"]).resolve())
    grid["overrides"] = list(grid.get("overrides") or []) + list(overrides or [])
    grid.setdefault("name", path.stem)
    return grid


def _format(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def expand_grid(grid: dict) -> list[Run]:
    """Every combination of the grid's values, in file order, with a readable folder name."""
    keys = list(grid["grid"])
    runs = []
    for values in itertools.product(*(grid["grid"][k] for k in keys)):
        coords = dict(zip(keys, values))
        name = "_".join(f"{k.rsplit('.', 1)[-1]}{_format(v)}" for k, v in coords.items())
        folder = Path(grid["output_dir"]) / name
        overrides = list(grid["overrides"]) + [f"{k}={v}" for k, v in coords.items()] + [f"output.dir={folder}"]
        runs.append(Run(name, folder, coords, overrides))
    return runs


def is_done(folder: Path) -> bool:
    summary = folder / "summary.json"
    if not summary.is_file():
        return False
    try:
        return bool(json.loads(summary.read_text()).get("done"))
    except json.JSONDecodeError:
        return False


def _try_lock(folder: Path) -> bool:
    """Claim ``folder`` for this process; a lock left by a dead process is taken over."""
    lock = folder / "running.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # another live process trains this run
            except (ProcessLookupError, ValueError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process died
                continue
            except PermissionError:
                return False  # alive, owned by another user
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _run_config(grid: dict, run: Run) -> dict:
    from ..config import load_config

    config = load_config(grid["base"], run.overrides)
    scaling = grid.get("lr_scaling")
    if scaling:
        batch = config["train"]["batch_size"]
        config["optim"]["lr"] = config["optim"]["lr"] * batch / scaling["reference_batch"]
    return config


def run_grid(grid: dict, train_fn: TrainFn | None = None, dry_run: bool = False) -> list[Run]:
    """Train every run of ``grid`` that is not done yet (in order); returns the runs.

    ``train_fn(config) -> summary`` defaults to :func:`hypernorm.engine.train`, which resumes a run folder that
    holds a checkpoint. A failing run is recorded in its folder's ``error.txt`` and the others still run; the
    failures are raised together at the end.
    """
    if train_fn is None:
        from ..engine import train as train_fn
    runs = expand_grid(grid)
    todo = [run for run in runs if not is_done(run.folder)]
    print(f"experiment {grid['name']}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
    failures = []
    for run in tqdm(todo, desc=grid["name"], unit="run", disable=dry_run):
        config = _run_config(grid, run)
        if dry_run:
            print(f"  would run {run.name}: {' '.join(run.overrides)}")
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        if not _try_lock(run.folder):
            continue
        try:
            if is_done(run.folder):  # finished by another process meanwhile
                continue
            (run.folder / "run.json").write_text(json.dumps({"name": run.name, "coords": run.coords}, indent=2))
            train_fn(config)
        except Exception as err:  # keep going: one diverged run must not stop a night of experiments
            (run.folder / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
            failures.append(f"{run.name}: {type(err).__name__}: {err}")
        finally:
            (run.folder / "running.lock").unlink(missing_ok=True)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))
    return runs
