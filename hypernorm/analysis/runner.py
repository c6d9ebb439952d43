"""Experiment grids: many (model, norm, batch size, seed, ...) training runs from one YAML file, resumable.

A grid file::

    name: cifar_reduced
    base: ../cifar/reduced_resnet20.yaml      # training config, relative to this file
    output_dir: runs/cifar_reduced            # one folder per run below it
    overrides: [train.epochs=15]              # applied to every run
    grid:                                     # every combination is one run
      model.norm: [bn, bhn]
      train.batch_size: [128, 8, 2]
      train.seed: [0, 1, 2]
    lr_scaling: {reference_batch: 128}        # optional: lr *= batch / reference_batch (linear scaling rule)
    exclude:                                  # optional: combinations left out (all keys given must match)
      - {model.norm: bhn, seed: 2}

Each run folder gets ``run.json`` (its grid coordinates) beside what the training engine writes, and
``error.txt`` (one line) when its last attempt failed. A run the engine recorded as failed (``status: failed``
in its summary, e.g. diverged) is not run again, as the engine would refuse it: it stays a failure of the grid
until its folder is deleted. Other failures (an exception the engine did not record) are tried again.

A finished run counts only for the exact resolved config that made it. Before anything is trained, every run's
resolved config is compared with the ``config.yaml`` in its folder (all keys but those that may differ on
resume: where data lives, workers, device, threads, output folder); if any differ, the whole grid is refused
with a message naming the differing keys: give the new config its own ``--output-dir``, or delete the old
folders. ``--dry-run`` lists each run as done, to run, running (in another process), failed or conflicting.

Runs that are not done (never started, interrupted, failed) are trained; an interrupted one resumes from its
checkpoint. A failing run does not stop the grid: it is recorded and reported, one line each. Several
processes may work on one grid (``--workers N`` starts them; separate ``hypernorm experiment`` commands work
too): a process trains a run only while it holds an exclusive ``flock`` on the run's ``running.lock``, which
the OS releases when the process ends however it ends, so a crashed runner's run is taken over by exactly one
other process.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm.auto import tqdm

from ..config import flatten
from .aggregate import read_run_status

__all__ = ["Run", "PlannedRun", "GridResult", "load_grid", "expand_grid", "plan_grid", "run_grid",
           "config_differences", "usable_workers", "LOCK_NAME"]

TrainFn = Callable[[dict], Any]
REQUIRED_KEYS = ("base", "output_dir", "grid")
LOCK_NAME = "running.lock"


@dataclass(frozen=True)
class Run:
    name: str
    folder: Path
    coords: dict[str, Any]  # grid key -> value
    overrides: list[str]  # key=value overrides for the base config, in order


@dataclass
class PlannedRun:
    run: Run
    config: dict[str, Any]  # resolved: defaults filled in, validated, lr scaled
    state: str  # done | to run | running | failed (recorded by the engine; not run again) | conflict
    detail: str = ""
    differing: list[str] = field(default_factory=list)  # config keys that differ from the folder's run


@dataclass
class GridResult:
    planned: list[PlannedRun]
    trained: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "run: what went wrong", one line each
    passed_by: list[str] = field(default_factory=list)  # taken or finished by another process meanwhile


def load_grid(path: str | os.PathLike, overrides: list[str] | None = None,
              output_dir: str | os.PathLike | None = None) -> dict:
    """Read a grid file; relative ``base`` resolves against the file, ``overrides`` append to its own;
    ``output_dir`` replaces the file's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment grid {str(path)!r} does not exist")
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"experiment grid {str(path)!r} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(grid, dict):
        raise ValueError(f"experiment grid {str(path)!r} must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in grid]
    if missing:
        raise ValueError(f"experiment grid {str(path)!r} lacks {', '.join(missing)} (needs {', '.join(REQUIRED_KEYS)})")
    if not isinstance(grid["grid"], dict) or not all(isinstance(v, list) and v for v in grid["grid"].values()):
        raise ValueError(f"experiment grid {str(path)!r}: 'grid' maps config keys to non-empty lists of values")
    if not isinstance(grid.get("overrides") or [], list):
        raise ValueError(f"experiment grid {str(path)!r}: 'overrides' is a list of key=value strings")
    scaling = grid.get("lr_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and isinstance(scaling.get("reference_batch"), int)
                                    and scaling["reference_batch"] > 0):
        raise ValueError(f"experiment grid {str(path)!r}: lr_scaling is {{reference_batch: <positive int>}}")
    exclude = grid.get("exclude") or []
    if not (isinstance(exclude, list) and all(isinstance(e, dict) and e and set(e) <= set(grid["grid"])
                                              for e in exclude)):
        raise ValueError(f"experiment grid {str(path)!r}: 'exclude' is a list of mappings from grid keys "
                         f"({', '.join(grid['grid'])}) to the values of the combinations to leave out")
    grid["base"] = str((path.parent / grid["base"]).resolve())
    grid["overrides"] = [str(o) for o in grid.get("overrides") or []] + list(overrides or [])
    if output_dir is not None:
        grid["output_dir"] = str(output_dir)
    grid.setdefault("name", path.stem)
    return grid


def _format(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def expand_grid(grid: dict) -> list[Run]:
    """Every combination of the grid's values but those ``exclude`` lists, in file order, with a readable folder
    name."""
    keys = list(grid["grid"])
    runs = []
    for values in itertools.product(*(grid["grid"][k] for k in keys)):
        coords = dict(zip(keys, values))
        if any(all(coords[k] == v for k, v in left_out.items()) for left_out in grid.get("exclude") or []):
            continue
        name = "_".join(f"{k.rsplit('.', 1)[-1]}{_format(v)}" for k, v in coords.items())
        folder = Path(grid["output_dir"]) / name
        overrides = list(grid["overrides"]) + [f"{k}={v}" for k, v in coords.items()] + [f"output.dir={folder}"]
        runs.append(Run(name, folder, coords, overrides))
    counts = Counter(r.name for r in runs)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:  # two runs in one folder: the second would find the first's result and count it as its own
        raise ValueError(f"experiment grid {grid['name']!r} gives {len(runs)} runs but only {len(counts)} "
                         f"folder(s) (e.g. {repeated[0]} twice): a value repeats in 'grid'")
    return runs


def _run_config(grid: dict, run: Run) -> dict:
    from ..config import load_config
    from ..engine import resolve_config

    config = load_config(grid["base"], run.overrides)
    scaling = grid.get("lr_scaling")
    if scaling:
        batch = config["train"]["batch_size"]
        config["optim"]["lr"] = config["optim"]["lr"] * batch / scaling["reference_batch"]
    return resolve_config(config)


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"key: saved -> wanted"`` for every key of ``wanted`` that differs, except those a resumed run may
    change. A key the saved config lacks (added to the defaults since) compares as its default."""
    from ..engine import DEFAULT_CONFIG, RESUMABLE_DIFFERENCES

    old, new = {**flatten(DEFAULT_CONFIG), **flatten(saved)}, flatten(wanted)
    keys = [k for k in new if k not in RESUMABLE_DIFFERENCES]
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]


def _lock_held(folder: Path) -> bool:
    """Whether another process holds the run's lock now (a probe: takes and drops it when free)."""
    lock = _claim(folder)
    if lock is None:
        return True
    _release(lock, folder)
    return False


def _plan(run: Run, config: dict[str, Any], probe_locks: bool) -> PlannedRun:
    folder = run.folder
    saved_path = folder / "config.yaml"
    state = read_run_status(folder)
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, dict):
            return PlannedRun(run, config, "conflict", f"{saved_path} is unreadable")
        differences = config_differences(saved, config)
        if differences:
            return PlannedRun(run, config, "conflict", "; ".join(differences),
                              [d.split(":", 1)[0] for d in differences])
    elif state.status == "done":
        return PlannedRun(run, config, "conflict", "finished, but without config.yaml: its config is unknown")
    if state.status == "done":
        return PlannedRun(run, config, "done")
    if state.summary.get("status") == "failed":  # recorded by the engine (e.g. diverged): the same config fails again
        return PlannedRun(run, config, "failed", f"{state.reason} (delete {folder} to run it again)")
    if probe_locks and folder.is_dir() and _lock_held(folder):
        return PlannedRun(run, config, "running", "held by another process")
    detail = {"failed": f"failed before ({state.reason}); tried again", "running": f"resumes ({state.reason})"}
    return PlannedRun(run, config, "to run", detail.get(state.status, ""))


def plan_grid(grid: dict, probe_locks: bool = False) -> list[PlannedRun]:
    """Each run with its resolved config and state. Every config is resolved first, so a bad value in any run
    is an error before anything is written. ``probe_locks`` (for listing only) marks the runs another process
    holds as running; a runner finds them when it tries to claim them."""
    configs = [(run, _run_config(grid, run)) for run in expand_grid(grid)]
    return [_plan(run, config, probe_locks) for run, config in configs]


def _claim(folder: Path, attempts: int = 1) -> int | None:
    """An open descriptor holding an exclusive flock on the run's lock file, or None if another process holds
    it (``attempts`` tries, 20 ms apart: a --dry-run elsewhere holds it for a moment only). The OS drops the
    lock when its holder dies, so there is no stale lock to take over by hand."""
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            attempts -= 1
            if attempts <= 0:
                return None
            time.sleep(0.02)
            continue
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # for people; the flock is what counts
            return fd
        os.close(fd)  # its holder removed the file after we opened it: lock the file now at that path


def _release(fd: int, folder: Path) -> None:
    (folder / LOCK_NAME).unlink(missing_ok=True)  # while still locked: see the inode check in _claim
    os.close(fd)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _train_claimed(planned: PlannedRun, train_fn: TrainFn) -> tuple[str, str]:
    """Train one run under its lock: ("trained" | "failed" | "passed by", one-line detail)."""
    run = planned.run
    run.folder.mkdir(parents=True, exist_ok=True)
    lock = _claim(run.folder, attempts=5)
    if lock is None:
        return "passed by", "held by another process"
    try:
        if read_run_status(run.folder).status == "done":
            return "passed by", "finished by another process"
        (run.folder / "error.txt").unlink(missing_ok=True)
        (run.folder / "run.json").write_text(json.dumps({"name": run.name, "coords": run.coords}, indent=2))
        train_fn(planned.config)
    except Exception as err:  # keep going: one diverged run must not stop a night of experiments
        message = _one_line(err)
        (run.folder / "error.txt").write_text(message + "\n")
        return "failed", message
    finally:
        _release(lock, run.folder)
    state = read_run_status(run.folder)
    if state.status != "done":  # e.g. the engine recorded a divergence and returned
        return "failed", state.reason or f"ended with status {state.status}"
    return "trained", ""


def _exit_with_runner(runner_pid: int) -> None:
    """End this worker as soon as its runner is gone. A runner killed by a signal runs no cleanup, and its
    orphaned workers would go on training while the next runner trains other runs (or, if someone deleted
    the lock files, the same ones): a grid then holds more processes than cores."""
    def watch() -> None:
        while os.getppid() == runner_pid:
            time.sleep(0.5)
        os._exit(3)  # the run's last checkpoint stays; its lock goes with the process

    threading.Thread(target=watch, name="exit-with-runner", daemon=True).start()


def _worker(planned: PlannedRun, train_fn: TrainFn, conn: multiprocessing.connection.Connection,
            runner_pid: int) -> None:
    """One run in a worker process; everything it prints goes to the run folder's train.log."""
    _exit_with_runner(runner_pid)
    planned.run.folder.mkdir(parents=True, exist_ok=True)
    with open(planned.run.folder / "train.log", "ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        conn.send(_train_claimed(planned, train_fn))
        sys.stdout.flush()
        sys.stderr.flush()
    conn.close()


def usable_workers(workers: int | str, on_gpu: bool = False) -> int:
    """``auto``: the cores this process may use (1 when the runs train on a GPU, which they would share);
    otherwise a positive int."""
    if workers == "auto":
        return 1 if on_gpu else len(os.sched_getaffinity(0))
    try:
        count = int(workers)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ValueError(f"--workers must be a positive integer or 'auto', got {workers!r}")
    return count


def _on_gpu(todo: list[PlannedRun]) -> bool:
    devices = {p.config["train"]["device"] for p in todo}
    if devices <= {"cpu"}:
        return False
    if "cuda" in devices:
        return True
    import torch  # train.device=auto: CUDA when available

    return torch.cuda.is_available()


def _with_one_thread(planned: PlannedRun) -> PlannedRun:
    """Worker processes share the cores: one torch thread each unless train.threads is set."""
    if planned.config["train"]["threads"] is not None:
        return planned
    config = {**planned.config, "train": {**planned.config["train"], "threads": 1}}
    return PlannedRun(planned.run, config, planned.state, planned.detail, planned.differing)


def _run_parallel(todo: list[PlannedRun], train_fn: TrainFn, workers: int):
    """Yield (run, outcome, detail) as worker processes (spawned, one run each, at most ``workers`` at once)
    finish."""
    context = multiprocessing.get_context("spawn")
    pending = deque(_with_one_thread(p) for p in todo)
    active: dict[Any, tuple[Any, Any, PlannedRun]] = {}
    try:
        while pending or active:
            while pending and len(active) < workers:
                planned = pending.popleft()
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(planned, train_fn, sender, os.getpid()),
                                          name=f"hypernorm-{planned.run.name}")
                process.start()
                sender.close()
                active[process.sentinel] = (process, receiver, planned)
            for sentinel in multiprocessing.connection.wait(list(active)):
                process, receiver, planned = active.pop(sentinel)
                process.join()
                try:
                    outcome, detail = receiver.recv()
                except EOFError:  # it died before answering
                    outcome, detail = "failed", f"worker process died (exit code {process.exitcode}); see " \
                                                f"{planned.run.folder / 'train.log'}"
                receiver.close()
                yield planned, outcome, detail
    finally:
        for process, _, _ in active.values():  # interrupted: stop the workers (their locks go with them)
            process.terminate()
            process.join()


def run_grid(grid: dict, train_fn: TrainFn | None = None, dry_run: bool = False,
             workers: int | str = 1) -> GridResult:
    """Train every run of ``grid`` that is not done, ``workers`` at a time; returns what happened.

    ``train_fn(config)`` defaults to :func:`hypernorm.engine.train`, which resumes a run folder that holds a
    checkpoint. With ``workers`` > 1 each run trains in its own spawned process (``train_fn`` must be
    picklable), with one torch thread unless ``train.threads`` is set, its output in the run's ``train.log``.
    Raises ValueError, before training anything, when a run folder holds a run of a different config.
    """
    if train_fn is None:
        from ..engine import train as train_fn
    planned = plan_grid(grid, probe_locks=dry_run)
    counts = {state: sum(p.state == state for p in planned)
              for state in ("done", "to run", "running", "failed", "conflict")}
    print(f"experiment {grid['name']}: {len(planned)} runs, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n
                                                                          or s in ("done", "to run")))
    result = GridResult(planned)
    if dry_run:
        for p in planned:
            print(f"  {p.state:<8} {p.run.name}" + (f": {p.detail}" if p.detail else ""))
        return result
    conflicts = [p for p in planned if p.state == "conflict"]
    if conflicts:
        keys = list(dict.fromkeys(k for p in conflicts for k in p.differing)) or ["config.yaml"]
        first = conflicts[0]
        raise ValueError(
            f"{len(conflicts)} run folder(s) of grid {grid['name']!r} hold runs of a different config (differing "
            f"keys: {', '.join(keys)}; e.g. {first.run.folder}: {first.detail}); give this config its own "
            f"--output-dir, or delete those folders to start over")
    todo = [p for p in planned if p.state == "to run"]
    order = {p.run.name: i for i, p in enumerate(planned)}
    failed = [(order[p.run.name], f"{p.run.name}: {p.detail}") for p in planned if p.state == "failed"]
    workers = min(usable_workers(workers, on_gpu=workers == "auto" and _on_gpu(todo)), max(1, len(todo)))
    with tqdm(total=len(todo), desc=grid["name"], unit="run", disable=not todo) as bar:
        if workers == 1:
            outcomes = ((p, *_train_claimed(p, train_fn)) for p in todo)
        else:
            tqdm.write(f"{len(todo)} runs in {workers} worker processes; each run's output is in its folder's "
                       f"train.log")
            outcomes = _run_parallel(todo, train_fn, workers)
        for p, outcome, detail in outcomes:
            if outcome == "failed":
                failed.append((order[p.run.name], f"{p.run.name}: {detail}"))
                tqdm.write(f"FAILED {p.run.name}: {detail}")
            elif outcome == "passed by":
                result.passed_by.append(p.run.name)
            else:
                result.trained.append(p.run.name)
            bar.update(1)
    result.failures = [line for _, line in sorted(failed)]  # grid order, however the workers finished
    if result.passed_by:
        print(f"experiment {grid['name']}: {len(result.passed_by)} run(s) left to the other process(es) working on "
              f"them: {', '.join(result.passed_by)}")
    return result
