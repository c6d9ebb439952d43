"""The one training loop of every task: seeding, SGD and its LR schedule, autocast, clipping, the step, DDP,
atomic checkpoints with RNG states, resume, progress bar, metrics rows and the finished state.

A task (classification, detection) supplies only what differs: the model, the data, the loss of one batch and
the evaluation (:class:`Task`). A run folder holds ``config.yaml``, ``metrics.csv`` (one row per epoch),
``summary.json`` and ``checkpoint.pt``. Whether a run is finished is one fact, the checkpoint's ``status``
(``running``, ``done`` or ``failed``); summary.json repeats it and is rewritten from the checkpoint when a kill
left the two disagreeing.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import dump_config, flatten
from ..nn import HyperNorm, cpu_kernel
from .checkpoint import atomic_write, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from .distributed import DistEnv, all_gather_object, all_reduce_sum, barrier

__all__ = ["Task", "TrainParts", "TrainingDiverged", "fit", "lr_factor", "build_optimizer", "build_scheduler",
           "seed_everything", "threads", "write_text", "autocast"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 2
# what load() reads from a checkpoint to continue a run
RESUME_ENTRIES = ("model", "optimizer", "scheduler", "scaler", "rng", "history", "epoch")


class TrainingDiverged(FloatingPointError):
    """A non-finite train or test loss: the run stops and is marked failed."""


def lr_factor(iteration: int, iters_per_epoch: int, optim: dict[str, Any], epochs: int) -> float:
    """The multiplier of optim.lr at an iteration: linear warm-up (``warmup_iters``, or ``warmup_epochs`` of
    iterations), then step decay at epoch ``milestones`` or cosine decay to ``min_lr``."""
    if "warmup_iters" in optim:
        warmup = optim["warmup_iters"]
    else:
        warmup = int(round(optim["warmup_epochs"] * iters_per_epoch))
    if iteration < warmup:
        start = optim["warmup_start_factor"]
        return start + (1.0 - start) * iteration / warmup
    if optim["sched"] == "step":
        return optim["gamma"] ** sum(iteration >= m * iters_per_epoch for m in optim["milestones"])
    total = epochs * iters_per_epoch
    progress = (iteration - warmup) / max(1, total - warmup)
    floor = optim["min_lr"] / optim["lr"] if optim["lr"] else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, optim: dict[str, Any], lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=optim["momentum"],
                           weight_decay=optim["weight_decay"], nesterov=optim["nesterov"])


def build_scheduler(optimizer: torch.optim.Optimizer, optim: dict[str, Any], iters_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch, optim, epochs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def threads(count: int | None):
    """torch's CPU thread count for one run, restored after it (the setting is not the caller's)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


@dataclass
class TrainParts:
    """What a task builds for training: the model (on the device, not yet wrapped) and its train loader."""
    model: nn.Module
    loader: Iterable
    sampler: Any  # has set_epoch(epoch) (a DistributedSampler), or None
    images_per_batch: int  # per process, for images/s


class Task:
    """What differs between tasks. ``fit`` calls build, then per batch train_step, per epoch train_stats and
    evaluate, and summary_fields for summary.json."""

    kind = "task"  # stored in the checkpoint: a checkpoint of another task is refused
    metric_fields: list[str] = []  # the columns of metrics.csv
    resumable_differences: set[str] = set()  # config keys a resumed run may change

    def __init__(self, config: dict[str, Any], env: DistEnv, log) -> None:
        self.config, self.env, self.log = config, env, log

    def base_lr(self, global_batch: int) -> float:
        return self.config["optim"]["lr"]

    def build(self) -> TrainParts:
        raise NotImplementedError

    def train_step(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimize and the per-batch values to sum over the epoch (e.g. loss x count, hits)."""
        raise NotImplementedError

    def train_stats(self, sums: dict[str, float]) -> dict[str, float]:
        """Row fields from the epoch's sums over all processes; must hold ``train_loss``."""
        raise NotImplementedError

    def evaluate(self, net: nn.Module, epoch: int, last: bool, progress: bool) -> dict[str, Any] | None:
        """Row fields of the evaluation after ``epoch`` (``test_loss`` if there is one), or None when skipped."""
        raise NotImplementedError

    def summary_fields(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, parts: TrainParts, iters: int, global_batch: int) -> str:
        return ""

    def graph_captured(self) -> None:
        """Called once the training steps run as CUDA graphs (Python in the forward no longer runs per step)."""

    def graph_inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The model's inputs for ``batch``: what train.cuda_graphs captures the forward with."""
        raise ValueError(f"config key 'train.cuda_graphs' expects false for {self.kind} (its model takes no fixed "
                         f"shape), got true")

    def epoch_line(self, row: dict[str, Any]) -> str:
        return " | ".join(f"{k} {row[k]:.4g}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                          for k in self.metric_fields if row.get(k) is not None)


def _metrics_csv(fields: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    return out.getvalue()


def check_resumable(saved: dict[str, Any], config: dict[str, Any], path: Path, allowed: set[str]) -> None:
    old, new = flatten(saved), flatten(config)
    changed = [k for k in sorted(set(new) | set(old)) if k not in allowed and old.get(k) != new.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"run folder {path} holds a different run ({diff}); use another output.dir, or delete "
                         f"{path / CHECKPOINT} to start over")


class _Fit:
    """One run: ``restore`` (the checkpoint, if any), ``build`` (model, data, optimizer), ``load`` (the checkpoint
    into them), ``fit`` (the epochs)."""

    def __init__(self, task_class: type[Task], config: dict[str, Any], env: DistEnv, quiet: bool) -> None:
        self.config, self.env = config, env
        self.quiet = quiet or not env.is_main
        self.progress = not self.quiet and sys.stderr.isatty()
        self.dir = Path(config["output"]["dir"])
        self.ckpt_path = self.dir / CHECKPOINT
        self.task = task_class(config, env, self.log)
        self.history: list[dict[str, Any]] = []
        self.resized: list[dict[str, Any]] = []
        self.start_epoch, self.iteration = 0, 0
        self.global_batch = config["train"]["batch_size"] * env.world_size

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)

    # -- restore: what the run folder already holds --------------------------------------------------------------
    def restore(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: a fresh run), after refusing one that belongs to another run."""
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"config key 'output.dir' expects a folder, got {str(self.dir)!r}, which is a file")
        if not self.ckpt_path.is_file():
            summary = self.dir / "summary.json"
            if summary.is_file() and _read_json(summary).get("status") == "failed":
                self._refuse_failed(_read_json(summary).get("reason"))
            return None
        state = load_checkpoint(self.ckpt_path)
        kind = state.get("task", "classification")
        if kind != self.task.kind:
            raise ValueError(f"checkpoint {str(self.ckpt_path)!r} holds a {kind} run, not {self.task.kind}; use "
                             f"another output.dir")
        allowed = set(self.task.resumable_differences)
        if self.config["train"]["allow_resize"]:
            allowed.add("train.batch_size")
        check_resumable(state["config"], self.config, self.dir, allowed)
        status = state.get("status", "done" if state.get("done") else "running")
        if status == "failed":
            self._refuse_failed(state.get("reason"))
        if status != "done":
            missing = [k for k in RESUME_ENTRIES if k not in state]
            if missing:
                raise ValueError(f"checkpoint {str(self.ckpt_path)!r} cannot be resumed: it lacks "
                                 f"{', '.join(missing)}; delete it to start over")
            self._check_size(state)
        elif not isinstance(state.get("summary"), dict):
            raise ValueError(f"checkpoint {str(self.ckpt_path)!r} is marked done but holds no summary; delete it to "
                             f"start over")
        return state

    def _refuse_failed(self, reason: str | None) -> None:
        raise ValueError(f"run folder {self.dir} failed ({reason}); change the config and use another output.dir, "
                         f"or delete {self.dir} to run it again")

    def _check_size(self, state: dict[str, Any]) -> None:
        # checkpoints of the first format hold them in the summary and as the number of RNG states
        world = state.get("world_size", len(state["rng"]))
        batch = state.get("global_batch", (state.get("summary") or {}).get("global_batch"))
        if (world, batch) == (self.env.world_size, self.global_batch):
            return
        before = f"{world} process(es), global batch {batch}"
        now = f"{self.env.world_size} process(es), global batch {self.global_batch}"
        if not self.config["train"]["allow_resize"]:
            raise ValueError(f"run folder {self.dir} was trained with {before}; this resume has {now}. Resume with "
                             f"the same world size and train.batch_size, or pass train.allow_resize=true to continue "
                             f"with the new size (the LR schedule is realigned and summary.json records it)")
        self.resized = state.get("resized", []) + [{"after_epoch": state["epoch"], "from": before, "to": now}]
        self.log(f"resizing {self.dir} after epoch {state['epoch']}: {before} -> {now}")

    def finished(self, state: dict[str, Any]) -> dict[str, Any]:
        """A finished run's summary; files a kill left behind disagreeing with the checkpoint are rewritten."""
        summary = dict(state["summary"], status="done", done=True, run_dir=str(self.dir))  # the folder may have moved
        if self.env.is_main:
            on_disk = _read_json(self.dir / "summary.json") if (self.dir / "summary.json").is_file() else None
            if on_disk != summary or not (self.dir / "metrics.csv").is_file():
                self._write_files(state["config"], state["history"], summary)
                self.log(f"{self.dir}: summary.json and metrics.csv rewritten from the finished checkpoint")
            else:
                self.log(f"{self.dir} is finished; nothing to do")
        barrier(self.env)
        return summary

    # -- build: model, data, optimizer --------------------------------------------------------------------------
    def build(self) -> None:
        cfg, env = self.config, self.env
        tcfg = cfg["train"]
        if tcfg.get("deterministic") and env.device.type == "cuda":
            # CPU kernels are already deterministic for a fixed thread count (resume is tested on CPU), and the
            # global flag makes CPU training re-select kernels slowly; on CUDA it is needed.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not tcfg.get("deterministic", False)
        seed_everything(tcfg["seed"])  # same initial weights on every rank (DDP also broadcasts rank 0's)
        parts = self.task.build()
        self.parts, self.model = parts, parts.model
        seed_everything(tcfg["seed"] + env.rank)  # different augmentation per rank
        self.iters = len(parts.loader)
        if self.iters == 0:
            raise ValueError(f"the train set has fewer images per process than train.batch_size="
                             f"{tcfg['batch_size']} x {env.world_size} process(es); lower the batch size or use "
                             f"more data")
        optim = cfg["optim"]
        self.optimizer = build_optimizer(self.model, optim, self.task.base_lr(self.global_batch))
        self.scheduler = build_scheduler(self.optimizer, optim, self.iters, tcfg["epochs"])
        self.amp = tcfg["amp"] and env.device.type == "cuda"
        if tcfg["amp"] and not self.amp:  # would train in float32 under a config that says float16
            raise ValueError(f"config key 'train.amp' expects false on {env.device.type} (float16 autocast is for "
                             f"CUDA), got true")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        compile_model = tcfg.get("compile", False)
        if compile_model is None:  # null: where it was measured to pay
            steps = min(tcfg["epochs"] * self.iters, tcfg.get("max_iters") or math.inf)
            why_not = auto_compile_refusal(self.model, env.device, steps, env.distributed,
                                           bool(tcfg.get("cuda_graphs")))
            compile_model = why_not is None
            self.log(f"train.compile=null: {'eager, ' + why_not if why_not else 'compiling'} (docs/performance.md)")
        self.compiled = bool(compile_model)
        # eager HyperNorm-over-BatchNorm layers on a CPU run as the C++ kernel where it builds (same numbers to
        # float32 rounding as the Python paths, which it replaces); recorded beside `compiled`
        self.cpu_kernel = (env.device.type == "cpu" and not self.compiled
                           and any(isinstance(m, HyperNorm) and cpu_kernel.applies_to_norm(m.norm)
                                   for m in self.model.modules())
                           and cpu_kernel.available())  # last: it builds the kernel, which a BN run never needs
        self.net: nn.Module = torch.compile(self.model) if compile_model else self.model
        self.train_net = self.net
        self.graphed = False  # train.cuda_graphs: captured at the first batch, once the shapes are known
        if tcfg.get("cuda_graphs") and (env.device.type != "cuda" or env.distributed):
            raise ValueError(f"config key 'train.cuda_graphs' expects false on {env.device.type}"
                             f"{' with ' + str(env.world_size) + ' processes' if env.distributed else ''} (it "
                             f"captures one process's steps on one CUDA device), got true")
        if env.distributed:
            self.train_net = DistributedDataParallel(
                self.net, device_ids=[env.device] if env.device.type == "cuda" else None)

    # -- load: the checkpoint into what build made ---------------------------------------------------------------
    def load(self, state: dict[str, Any]) -> None:
        load_weights(self.model, state["model"], self.ckpt_path, "the configured model")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.start_epoch = state["history"], state["epoch"]
        self.iteration = state.get("iteration", self.start_epoch * self.iters)
        if self.resized:  # the schedule continues at the same point of the run in epochs, at the new length
            self.iteration = self.start_epoch * self.iters
            self.scheduler.last_epoch = self.iteration
            for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                           self.scheduler.lr_lambdas):
                group["lr"] = base * factor(self.iteration)
        states = state["rng"]
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank])  # last: nothing may draw random numbers between here and training
        else:
            self.log(f"resuming with {self.env.world_size} processes instead of {len(states)}: RNG states reseeded")
            seed_everything(self.config["train"]["seed"] + self.env.rank + 1000 * self.start_epoch)
        self.log(f"resumed {self.dir} after epoch {self.start_epoch}")

    # -- fit: the epochs -----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        tcfg = self.config["train"]
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text(self.dir / "config.yaml", dump_config(self.config))
        self.log(self.task.describe(self.parts, self.iters, self.global_batch))
        epochs, max_iters = tcfg["epochs"], tcfg.get("max_iters")
        for epoch in range(self.start_epoch + 1, epochs + 1):
            start = time.perf_counter()
            if self.parts.sampler is not None:
                self.parts.sampler.set_epoch(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            stats, train_time, steps = self._train_epoch(epoch, max_iters)
            last = epoch == epochs or (max_iters is not None and self.iteration >= max_iters)
            row: dict[str, Any] = {"epoch": epoch, "iteration": self.iteration, "lr": lr, **stats}
            if math.isfinite(stats["train_loss"]):
                row.update(self.task.evaluate(self.net, epoch, last, self.progress) or {})
            row["epoch_time_s"] = time.perf_counter() - start
            row["images_per_s"] = steps * self.parts.images_per_batch * self.env.world_size / train_time
            self.history.append(row)
            for key in ("train_loss", "test_loss"):
                if row.get(key) is not None and not math.isfinite(row[key]):
                    self._fail(f"non-finite {key.replace('_', ' ')} ({row[key]}) in epoch {epoch} (iteration "
                               f"{self.iteration}): training diverged; lower optim.lr or set train.grad_clip")
            self._save(epoch, "done" if last else "running")
            self.log(self.task.epoch_line(row))
            if last:
                break
        return self._summary("done")

    def _train_epoch(self, epoch: int, max_iters: int | None) -> tuple[dict[str, float], float, int]:
        env, clip = self.env, self.config["train"]["grad_clip"]
        net = self.train_net
        net.train()
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(self.parts.loader, desc=f"epoch {epoch}/{self.config['train']['epochs']}", leave=False,
                   disable=not self.progress)
        start, steps = time.perf_counter(), 0
        for batch in bar:
            if self.config["train"].get("cuda_graphs") and not self.graphed:
                self._capture(batch)
            with autocast(env.device, self.amp):
                loss, values = self.task.train_step(net, batch)
            if not env.distributed and not torch.isfinite(loss):
                # stop before the step, so the checkpointed weights stay finite; under DDP every rank must agree,
                # so there the epoch's reduced loss decides
                return {"train_loss": loss.item()}, time.perf_counter() - start, max(steps, 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.iteration += 1
            steps += 1
            with torch.no_grad():
                for key, value in values.items():
                    sums[key] = sums.get(key, 0) + value.detach().double()
            if self.progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.4g}")
            if max_iters is not None and self.iteration >= max_iters:
                break
        train_time = time.perf_counter() - start
        keys = sorted(sums)
        reduced = all_reduce_sum([float(sums[k]) for k in keys], env)
        return self.task.train_stats(dict(zip(keys, reduced))), train_time, steps

    def _capture(self, batch: Any) -> None:
        """Capture the model's training forward + backward as CUDA graphs (torch.cuda.make_graphed_callables);
        each later training step replays them with one launch instead of hundreds. Evaluation stays eager.

        The capture's warm-up passes would move the norms' running statistics with this batch: they are put back.
        Python code in the forward runs only at capture, so the relay diagnostics' sums are switched off for the
        captured passes and record the test phase alone (``Task.graph_captured``)."""
        from ..nn import track_relay

        model = self.model
        saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
        track_relay(model, False)
        inputs = self.task.graph_inputs(batch)
        torch.cuda.synchronize()
        torch.cuda.make_graphed_callables(model, inputs, allow_unused_input=True)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
        self.graphed = True
        self.task.graph_captured()
        self.log(f"train.cuda_graphs: captured the training forward + backward for inputs "
                 f"{', '.join(str(tuple(t.shape)) for t in inputs)}")

    def _summary(self, status: str, reason: str | None = None) -> dict[str, Any]:
        rows, tcfg = self.history, self.config["train"]
        summary = {
            **self.task.summary_fields(rows),
            "world_size": self.env.world_size,
            "batch_size_per_process": tcfg["batch_size"],
            "global_batch": self.global_batch,
            "epochs": tcfg["epochs"],
            "epochs_done": rows[-1]["epoch"] if rows else 0,
            "iterations_done": self.iteration,
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows) if rows else None,
            "mean_images_per_s": sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
            "device": str(self.env.device),
            "compiled": self.compiled,
            "cpu_kernel": self.cpu_kernel,
            "run_dir": str(self.dir),
            "status": status,
            "done": status == "done",  # for readers of the first format
        }
        if reason is not None:
            summary["reason"] = reason
        if status == "failed":  # no result of a failed run can reach a table; metrics.csv keeps the rows
            summary.update({key: None for key in ("final", "best") if key in summary})
        if self.resized:
            summary["resized"] = self.resized
        return summary

    def _state(self, epoch: int, status: str, summary: dict[str, Any], rng: list[Any]) -> dict[str, Any]:
        return {"format": FORMAT, "task": self.task.kind, "epoch": epoch, "iteration": self.iteration,
                "status": status, "done": status == "done", "config": self.config,
                "world_size": self.env.world_size, "global_batch": self.global_batch, "resized": self.resized,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "history": self.history, "summary": summary}

    def _save(self, epoch: int, status: str) -> None:
        rng = all_gather_object(rng_state(), self.env)  # every rank's state, restored per rank on resume
        summary = self._summary(status)
        if self.env.is_main:
            # the checkpoint first: it is the finished state; the other files are rewritten from it if a kill
            # lands in between
            save_checkpoint(self.ckpt_path, self._state(epoch, status, summary, rng))
            self._write_files(self.config, self.history, summary)
        barrier(self.env)

    def _write_files(self, config: dict[str, Any], history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.dir / "config.yaml", dump_config(config))
        write_text(self.dir / "metrics.csv", _metrics_csv(self.task.metric_fields, history))
        write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def _fail(self, reason: str) -> None:
        """Record the failure (the last good checkpoint keeps its weights, marked failed) and stop."""
        summary = self._summary("failed", reason)
        if self.env.is_main:
            if self.ckpt_path.is_file():
                state = load_checkpoint(self.ckpt_path)
                state.update(status="failed", done=False, reason=reason, summary=summary)
                save_checkpoint(self.ckpt_path, state)
            write_text(self.dir / "metrics.csv", _metrics_csv(self.task.metric_fields, self.history))
            write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        barrier(self.env)
        raise TrainingDiverged(f"{self.dir}: {reason}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a torn or foreign file: rewritten from the checkpoint


def fit(task_class: type[Task], config: dict[str, Any], env: DistEnv, quiet: bool = False) -> dict[str, Any]:
    """Train ``task_class`` on a resolved ``config`` into ``config["output"]["dir"]``; returns the summary."""
    run = _Fit(task_class, config, env, quiet)
    state = run.restore()
    if state is not None and state.get("status", "done" if state.get("done") else "running") == "done":
        return run.finished(state)
    run.build()
    if state is not None:
        run.load(state)
    return run.fit()


# train.compile=null compiles where it was measured to pay (docs/performance.md): a HyperNorm network, whose many
# small per-layer operations inductor fuses (ResNet-20 BHN: 0.84x eager per epoch on a 2-core CPU; a step of
# 10.4 ms compiled against 29.2 ms eager on an H200, 18.0 ms compiled on another), in a run long enough to repay
# the compile (about 2 minutes on that CPU, where a step saves about 0.1 s; a minute or more on the GPU, where it
# saves 11-19 ms). A BN ResNet-20 gained nothing on the CPU (0.99x) and stays eager.
AUTO_COMPILE_MIN_STEPS = {"cpu": 2_000, "cuda": 10_000}


def auto_compile_refusal(model: nn.Module, device: torch.device, steps: float, distributed: bool,
                         cuda_graphs: bool) -> str | None:
    """Why ``train.compile=null`` trains ``model`` eagerly, or None where it compiles it."""
    if not any(isinstance(module, HyperNorm) for module in model.modules()):
        return "no HyperNorm layer (compiling a plain network gained nothing measured)"
    if distributed:
        return "several processes (compiled DDP was not measured)"
    if cuda_graphs:
        return "train.cuda_graphs replays the eager step"
    if device.type not in AUTO_COMPILE_MIN_STEPS or sys.platform != "linux":
        return f"compiling was measured on Linux CPUs and CUDA GPUs, not {sys.platform} {device.type}"
    least = AUTO_COMPILE_MIN_STEPS[device.type]
    if steps < least:
        return f"{steps:,} training steps, fewer than the {least:,} that repay compiling on {device.type}"
    return compiler_refusal(device)


def compiler_refusal(device: torch.device) -> str | None:
    """None where torch.compile builds and runs a one-line kernel on ``device``; else why not, in one line
    (a machine without a C++ compiler, or without Triton for CUDA, fails here rather than in the first step)."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001  any failure means: train eagerly, and say why
        first_line = next(iter(str(err).strip().splitlines()), "")
        return f"torch.compile failed on a one-line kernel ({type(err).__name__}: {first_line[:200]})"
    return None
