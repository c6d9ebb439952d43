"""``train(config)``: train and evaluate a classifier into a run folder, resuming from its checkpoint.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch), ``summary.json``
(final and best test errors; ``done`` once finished) and ``checkpoint.pt`` (the last epoch, written atomically).
Errors are in percent. "final" is the last epoch; "best" is the epoch with the lowest test top-1 error, which is
selected on the test set (as the paper's baselines were) and therefore optimistic.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ..config import DEFAULT_CONFIG, dump_config, flatten, merge_config, validate_config
from ..data import Normalize, build_dataset
from ..models import create_model
from ..nn import CPUSyncBatchNorm, use_cpu_sync_batchnorm
from .checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistEnv, all_gather_object, all_reduce_sum, barrier, setup_distributed

__all__ = ["train", "evaluate", "evaluate_checkpoint", "build_optimizer", "build_scheduler", "lr_factor",
           "METRIC_FIELDS", "BEST_NOTE"]

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_top1_err", "test_loss", "test_top1_err", "test_top5_err",
                 "epoch_time_s", "images_per_s"]
BEST_NOTE = "best = the epoch with the lowest test top-1 error (selected on the test set, as the paper's baselines)"
# Keys that may differ when a run folder is resumed: where things are and how fast they load, not what is trained.
RESUMABLE_DIFFERENCES = {"data.root", "data.workers", "data.download", "data.test_batch_size", "output.dir",
                         "train.device", "train.threads"}


def lr_factor(iteration: int, iters_per_epoch: int, optim: dict[str, Any], epochs: int) -> float:
    """The multiplier of optim.lr at a given iteration: linear warm-up, then step or cosine decay."""
    warmup = int(round(optim["warmup_epochs"] * iters_per_epoch))
    if iteration < warmup:
        start = optim["warmup_start_factor"]
        return start + (1.0 - start) * iteration / warmup
    if optim["sched"] == "step":
        epoch = iteration // iters_per_epoch
        return optim["gamma"] ** sum(epoch >= m for m in optim["milestones"])
    total = epochs * iters_per_epoch
    progress = (iteration - warmup) / max(1, total - warmup)
    floor = optim["min_lr"] / optim["lr"] if optim["lr"] else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.SGD:
    if optim["nesterov"] and optim["momentum"] <= 0:
        raise ValueError("optim.nesterov needs optim.momentum > 0")
    return torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                           weight_decay=optim["weight_decay"], nesterov=optim["nesterov"])


def build_scheduler(optimizer: torch.optim.Optimizer, optim: dict[str, Any], iters_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, optim, epochs))


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, normalize: nn.Module, device: torch.device,
             env: DistEnv | None = None, amp: bool = False, channels_last: bool = False,
             progress: bool = False) -> dict[str, float]:
    """Test loss and top-1/top-5 error (%) over ``loader``; summed over processes when distributed."""
    model.eval()
    num_classes = None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for images, labels in tqdm(loader, desc="test", leave=False, disable=not progress):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = normalize(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images)
        num_classes = logits.shape[1]
        top1, top5 = _topk_correct(logits, labels, (1, min(5, num_classes)))
        sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum"), top1, top5,
                             torch.tensor(len(labels), device=device)]).double()
    loss, top1, top5, count = all_reduce_sum(sums.tolist(), env) if env is not None else sums.tolist()
    if count == 0:
        raise ValueError("the test set is empty")
    return {"loss": loss / count, "top1_err": 100.0 * (1 - top1 / count), "top5_err": 100.0 * (1 - top5 / count),
            "count": int(count)}


def _check_micro_batch(model: nn.Module, batch_size: int, env: DistEnv) -> None:
    """Batch norm in training needs 2+ values per channel; with batch 1 it fails deep inside the first forward."""
    if batch_size >= 2:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm)) and env.world_size > 1:
                continue  # statistics over all processes
            raise ValueError(
                f"train.batch_size=1 cannot train {name or 'the model'} ({type(module).__name__}): batch norm needs "
                f"at least 2 samples per process in training. Use train.batch_size >= 2, a batch-independent norm "
                f"(model.norm=gn or ghn), or SyncBN/SyncBHN over several processes.")


def _shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every rank evaluates a disjoint slice (no padding duplicates), so summed counts are exact."""
    if not env.distributed:
        return dataset
    return Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _metrics_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    return out.getvalue()


def _check_resumable(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    old, new = flatten(saved), flatten(config)
    changed = [k for k in new if k not in RESUMABLE_DIFFERENCES and old.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ValueError(f"run folder {path} holds a different run ({diff}); use another output.dir, or delete "
                         f"{path / 'checkpoint.pt'} to start over")


class _Run:
    def __init__(self, config: dict[str, Any], env: DistEnv, quiet: bool) -> None:
        self.config, self.env = config, env
        self.quiet = quiet or not env.is_main
        self.progress = not self.quiet and sys.stderr.isatty()
        self.dir = Path(config["output"]["dir"])
        self.ckpt_path = self.dir / "checkpoint.pt"

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)

    def run(self) -> dict[str, Any]:
        cfg, env = self.config, self.env
        tcfg, ocfg = cfg["train"], cfg["optim"]
        resume = load_checkpoint(self.ckpt_path) if self.ckpt_path.is_file() else None
        if resume is not None:
            _check_resumable(resume["config"], cfg, self.dir)
            if resume.get("done"):
                self.log(f"{self.dir} is finished; nothing to do")
                return resume["summary"]
        if tcfg["deterministic"] and env.device.type == "cuda":
            # CPU kernels are already deterministic for a fixed thread count (resume is tested on CPU), and the
            # global flag makes CPU training re-select kernels slowly; on CUDA it is needed.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not tcfg["deterministic"]
        _seed_everything(tcfg["seed"])

        train_set, info = build_dataset(cfg["data"], train=True)
        test_set, _ = build_dataset(cfg["data"], train=False)
        self.info = info
        # Same initial weights on every rank (DDP also broadcasts rank 0's); different augmentation per rank.
        model = create_model(cfg["model"]["name"], cfg["model"]["norm"],
                             cfg["model"]["num_classes"] or info.num_classes)
        if cfg["model"]["sync_bn"] and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if env.device.type == "cpu" and env.distributed:
            use_cpu_sync_batchnorm(model)
        batch = tcfg["batch_size"]
        _check_micro_batch(model, batch, env)
        model.to(env.device)
        if tcfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        _seed_everything(tcfg["seed"] + env.rank)

        sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=tcfg["seed"])
        workers = cfg["data"]["workers"]
        pin = env.device.type == "cuda"
        train_loader = DataLoader(train_set, batch, sampler=sampler, num_workers=workers, pin_memory=pin,
                                  drop_last=True)  # drop_last: a final batch of 1 would break batch norm
        test_loader = DataLoader(_shard(test_set, env), cfg["data"]["test_batch_size"] or batch,
                                 num_workers=workers, pin_memory=pin)
        iters = len(train_loader)
        if iters == 0:
            raise ValueError(f"the train set has {len(sampler)} images per process, fewer than train.batch_size="
                             f"{batch}; lower the batch size or use more data")
        normalize = Normalize(info.mean, info.std).to(env.device)
        optimizer = build_optimizer(model, ocfg)
        scheduler = build_scheduler(optimizer, ocfg, iters, tcfg["epochs"])
        amp = tcfg["amp"] and env.device.type == "cuda"
        if tcfg["amp"] and not amp:
            self.log("train.amp is for CUDA; training in float32 on this CPU")
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        net: nn.Module = torch.compile(model) if tcfg["compile"] else model
        train_net = DistributedDataParallel(net, device_ids=[env.device] if pin else None) if env.distributed \
            else net

        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        start_epoch = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            self.history, self.best, start_epoch = resume["history"], resume["best"], resume["epoch"]
            states = resume["rng"]
            if len(states) == env.world_size:
                set_rng_state(states[env.rank])  # last: nothing may draw random numbers between here and training
            else:
                self.log(f"resuming with {env.world_size} processes instead of {len(states)}: RNG states reseeded")
                _seed_everything(tcfg["seed"] + env.rank + 1000 * start_epoch)
            self.log(f"resumed {self.dir} after epoch {start_epoch}")
        self.global_batch = batch * env.world_size
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_text(self.dir / "config.yaml", dump_config(cfg))
        n_params = sum(p.numel() for p in model.parameters())
        self.n_params = n_params
        self.log(f"{cfg['model']['name']} / {cfg['model']['norm']} ({n_params / 1e6:.3f}M params) on {info.source}: "
                 f"{len(train_set)} train / {len(test_set)} test images, {env.world_size} process(es) x batch "
                 f"{batch} = global batch {self.global_batch}, {iters} iterations/epoch, device {env.device}")

        epochs = tcfg["epochs"]
        for epoch in range(start_epoch + 1, epochs + 1):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_stats, train_time = self._train_epoch(train_net, train_loader, normalize, optimizer, scheduler,
                                                        scaler, amp, epoch)
            row: dict[str, Any] = {"epoch": epoch, "lr": lr, **train_stats, "test_loss": None,
                                   "test_top1_err": None, "test_top5_err": None}
            if epoch % tcfg["eval_every"] == 0 or epoch == epochs:
                test = evaluate(net, test_loader, normalize, env.device, env, amp, tcfg["channels_last"],
                                self.progress)
                row.update(test_loss=test["loss"], test_top1_err=test["top1_err"], test_top5_err=test["top5_err"])
                if self.best is None or test["top1_err"] < self.best["top1_err"]:
                    self.best = {"top1_err": test["top1_err"], "top5_err": test["top5_err"], "epoch": epoch}
            row["epoch_time_s"] = time.perf_counter() - start
            row["images_per_s"] = iters * self.global_batch / train_time
            self.history.append(row)
            self._save(model, optimizer, scheduler, scaler, epoch, done=epoch == epochs)
            self.log(self._epoch_line(row))
        return self._summary(done=True)

    def _train_epoch(self, net, loader, normalize, optimizer, scheduler, scaler, amp, epoch):
        env, tcfg = self.env, self.config["train"]
        smoothing, clip = self.config["optim"]["label_smoothing"], tcfg["grad_clip"]
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, top-1 hits, count
        bar = tqdm(loader, desc=f"epoch {epoch}/{tcfg['epochs']}", leave=False, disable=not self.progress)
        start = time.perf_counter()
        for images, labels in bar:
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            images = normalize(images)
            if tcfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(env.device, amp):
                logits = net(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().float() * len(labels),
                                     (logits.argmax(1) == labels).sum(), torch.tensor(len(labels), device=env.device)
                                     ]).double()
            if self.progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        train_time = time.perf_counter() - start
        loss_sum, hits, count = all_reduce_sum(sums.tolist(), env)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged in epoch {epoch} (loss {loss_sum}); lower optim.lr or set "
                                     f"train.grad_clip")
        return {"train_loss": loss_sum / count, "train_top1_err": 100.0 * (1 - hits / count)}, train_time

    def _summary(self, done: bool) -> dict[str, Any]:
        cfg, info = self.config, self.info
        evaluated = [r for r in self.history if r["test_top1_err"] is not None]
        last = evaluated[-1] if evaluated else None
        rows = self.history
        return {
            "dataset": info.name,
            "data_source": info.source,
            "model": cfg["model"]["name"],
            "norm": cfg["model"]["norm"],
            "params": self.n_params,
            "world_size": self.env.world_size,
            "batch_size_per_process": cfg["train"]["batch_size"],
            "global_batch": self.global_batch,
            "epochs": cfg["train"]["epochs"],
            "epochs_done": rows[-1]["epoch"] if rows else 0,
            "final": None if last is None else {"top1_err": last["test_top1_err"], "top5_err": last["test_top5_err"],
                                                "epoch": last["epoch"]},
            "best": self.best,
            "best_selection": BEST_NOTE,
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows) if rows else None,
            "mean_images_per_s": sum(r["images_per_s"] for r in rows) / len(rows) if rows else None,
            "device": str(self.env.device),
            "run_dir": str(self.dir),
            "done": done,
        }

    def _save(self, model, optimizer, scheduler, scaler, epoch: int, done: bool) -> None:
        rng = all_gather_object(rng_state(), self.env)  # every rank's state, restored per rank on resume
        summary = self._summary(done)
        if self.env.is_main:
            save_checkpoint(self.ckpt_path, {
                "format": 1, "epoch": epoch, "done": done, "config": self.config, "dataset": asdict(self.info),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                "history": self.history, "best": self.best, "summary": summary,
            })
            _write_text(self.dir / "metrics.csv", _metrics_csv(self.history))
            _write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        barrier(self.env)

    @staticmethod
    def _epoch_line(row: dict[str, Any]) -> str:
        test = "" if row["test_top1_err"] is None else (
            f" | test loss {row['test_loss']:.4f} top-1 err {row['test_top1_err']:.2f}% "
            f"top-5 err {row['test_top5_err']:.2f}%")
        return (f"epoch {row['epoch']:>3} | lr {row['lr']:.4g} | train loss {row['train_loss']:.4f} top-1 err "
                f"{row['train_top1_err']:.2f}%{test} | {row['epoch_time_s']:.1f}s, {row['images_per_s']:.0f} img/s")


def _resolve(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in defaults (a partial dict is fine) and validate."""
    return validate_config(merge_config(DEFAULT_CONFIG, config))


def train(config: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Train into ``config["output"]["dir"]``, resuming from its checkpoint if there is one; returns the summary.

    Under torchrun every process calls this; the batch size is per process and rank 0 writes the run folder.
    """
    config = _resolve(config)
    threads = torch.get_num_threads()
    if config["train"]["threads"] is not None:
        torch.set_num_threads(config["train"]["threads"])
    env = setup_distributed(config["train"]["device"])
    try:
        return _Run(config, env, quiet).run()
    finally:
        torch.set_num_threads(threads)  # the setting is for this run, not for the caller's process
        if env.owns_group:
            torch.distributed.destroy_process_group()


def evaluate_checkpoint(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Test loss and top-1/top-5 error (%) of a checkpoint; ``overrides`` updates its config (e.g. data.root)."""
    state = load_checkpoint(path)
    config = _resolve(merge_config(state["config"], overrides or {}))
    threads = torch.get_num_threads()
    if config["train"]["threads"] is not None:
        torch.set_num_threads(config["train"]["threads"])
    env = setup_distributed(config["train"]["device"])
    try:
        test_set, info = build_dataset(config["data"], train=False)
        model = create_model(config["model"]["name"], config["model"]["norm"],
                             config["model"]["num_classes"] or info.num_classes)
        model.load_state_dict(state["model"])
        model.to(env.device)
        loader = DataLoader(_shard(test_set, env), config["data"]["test_batch_size"] or config["train"]["batch_size"],
                            num_workers=config["data"]["workers"])
        result = evaluate(model, loader, Normalize(info.mean, info.std).to(env.device), env.device, env,
                          config["train"]["amp"], config["train"]["channels_last"], progress)
        return {"checkpoint": str(path), "epoch": state["epoch"], "dataset": info.name, "data_source": info.source,
                "model": config["model"]["name"], "norm": config["model"]["norm"], **result}
    finally:
        torch.set_num_threads(threads)
        if env.owns_group:
            torch.distributed.destroy_process_group()

