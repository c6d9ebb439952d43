"""``train(config)``: train and evaluate a classifier into a run folder, resuming from its checkpoint.

Classification's part of the shared loop (:mod:`hypernorm.engine.loop`): the model, the data, the loss of a batch
and the test-set evaluation. A run folder holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row
per epoch), ``summary.json`` (final and best test errors; ``status`` done once finished) and ``checkpoint.pt``.
Errors are in percent. "final" is the last epoch; "best" is the epoch with the lowest test top-1 error, which is
selected on the test set (as the paper's baselines were) and therefore optimistic.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ..config import merge_config
from ..data import DeviceBatches, Normalize, build_dataset, in_memory_tensors
from ..models import create_model, model_info
from ..models.external import convert_defaults, is_external
from .checkpoint import load_checkpoint, load_weights
from .distributed import DistEnv, all_reduce_sum, process_group
from .loop import Task, TrainParts, autocast, build_optimizer, build_scheduler, fit, lr_factor, threads, write_text
from .schema import RESUMABLE_DIFFERENCES, resolve_config
from ..nn import RelayRecorder, syncs_across_processes, use_cpu_sync_batchnorm
from ..nn.diagnostics import write_relay_csv

__all__ = ["train", "evaluate", "evaluate_checkpoint", "build_optimizer", "build_scheduler", "lr_factor",
           "METRIC_FIELDS", "BEST_NOTE", "Classification"]

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_top1_err", "test_loss", "test_top1_err", "test_top5_err",
                 "epoch_time_s", "images_per_s"]
BEST_NOTE = "best = the epoch with the lowest test top-1 error (selected on the test set, as the paper's baselines)"


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


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
        with autocast(device, amp):
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
            if syncs_across_processes(module) and env.world_size > 1:
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


def _on_device(data: dict[str, Any], device: torch.device) -> bool:
    """data.on_device: null holds CIFAR on a CUDA device (the crop + flip run there); ImageNet never fits."""
    if data["on_device"] is None:
        return device.type == "cuda" and data["dataset"] != "imagenet"
    return data["on_device"]


class Classification(Task):
    kind = "classification"
    metric_fields = METRIC_FIELDS
    resumable_differences = RESUMABLE_DIFFERENCES

    def build(self) -> TrainParts:
        cfg, env = self.config, self.env
        tcfg = cfg["train"]
        train_set, info = build_dataset(cfg["data"], train=True)
        test_set, _ = build_dataset(cfg["data"], train=False)
        self.info = info
        classes = cfg["model"]["num_classes"]
        if classes is not None and classes < info.num_classes:
            raise ValueError(f"config key 'model.num_classes' expects at least the {info.num_classes} classes of "
                             f"{info.name}, got {classes}")
        model = create_model(cfg["model"]["name"], cfg["model"]["norm"], classes or info.num_classes)
        if tcfg["relay_diagnostics"]:
            name = cfg["model"]["name"]
            self.relay = RelayRecorder(model, convert_defaults(name) if is_external(name) else
                                       model_info(name).convert_options)
        else:
            self.relay = None
        if cfg["model"]["sync_bn"] and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if env.device.type == "cpu" and env.distributed:
            use_cpu_sync_batchnorm(model)
        batch = tcfg["batch_size"]
        _check_micro_batch(model, batch, env)
        model.to(env.device)
        if tcfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in model.parameters())
        sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=tcfg["seed"])
        workers, pin = cfg["data"]["workers"], env.device.type == "cuda"
        test_batch = cfg["data"]["test_batch_size"] or batch
        if _on_device(cfg["data"], env.device):
            loader = DeviceBatches(*in_memory_tensors(train_set), batch, env.device, sampler=sampler,
                                   augment=cfg["data"]["augment"], drop_last=True, seed=tcfg["seed"] + env.rank)
            self.test_loader = DeviceBatches(*in_memory_tensors(_shard(test_set, env)), test_batch, env.device)
        else:
            loader = DataLoader(train_set, batch, sampler=sampler, num_workers=workers, pin_memory=pin,
                                drop_last=True)  # drop_last: a final batch of 1 would break batch norm
            self.test_loader = DataLoader(_shard(test_set, env), test_batch, num_workers=workers, pin_memory=pin)
        self.normalize = Normalize(info.mean, info.std).to(env.device)
        self.sizes = (len(train_set), len(test_set))
        return TrainParts(model, loader, sampler, batch)

    def describe(self, parts: TrainParts, iters: int, global_batch: int) -> str:
        cfg, env = self.config, self.env
        return (f"{cfg['model']['name']} / {cfg['model']['norm']} ({self.n_params / 1e6:.3f}M params) on "
                f"{self.info.source}: {self.sizes[0]} train / {self.sizes[1]} test images, {env.world_size} "
                f"process(es) x batch {cfg['train']['batch_size']} = global batch {global_batch}, {iters} "
                f"iterations/epoch, device {env.device}")

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalize(images.to(self.env.device, non_blocking=True))
        if self.config["train"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def graph_inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        return (self._inputs(batch[0]),)

    def graph_captured(self) -> None:
        if self.relay is not None and self.relay.hypernorm:
            self.relay.test_only()  # the captured training passes run no Python: h, c are recorded in eval

    def train_step(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch
        labels = labels.to(self.env.device, non_blocking=True)
        logits = net(self._inputs(images))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config["optim"]["label_smoothing"])
        with torch.no_grad():
            return loss, {"loss_sum": loss.detach().float() * len(labels), "hits": (logits.argmax(1) == labels).sum(),
                          "count": torch.tensor(len(labels), device=self.env.device)}

    def train_stats(self, sums: dict[str, float]) -> dict[str, float]:
        count = sums["count"]
        return {"train_loss": sums["loss_sum"] / count, "train_top1_err": 100.0 * (1 - sums["hits"] / count)}

    def evaluate(self, net: nn.Module, epoch: int, last: bool, progress: bool) -> dict[str, Any] | None:
        relay_rows = self.relay.read(epoch, "train") if self.relay and self.relay.records_train else []
        if epoch % self.config["train"]["eval_every"] and not last:
            self._write_relay(relay_rows)
            return None
        tcfg = self.config["train"]
        test = evaluate(net, self.test_loader, self.normalize, self.env.device, self.env,
                        tcfg["amp"] and self.env.device.type == "cuda", tcfg["channels_last"], progress)
        self._write_relay(relay_rows + (self.relay.read(epoch, "test") if self.relay else []))
        return {"test_loss": test["loss"], "test_top1_err": test["top1_err"], "test_top5_err": test["top5_err"]}

    def _write_relay(self, rows: list[dict[str, Any]]) -> None:
        """relay.csv: the relay diagnostics of rank 0's samples (hypernorm.nn.diagnostics)."""
        if rows and self.env.is_main:
            write_relay_csv(Path(self.config["output"]["dir"]) / "relay.csv", rows, write_text)

    def summary_fields(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        cfg, info = self.config, self.info
        evaluated = [r for r in history if r.get("test_top1_err") is not None]
        last = evaluated[-1] if evaluated else None
        best = min(evaluated, key=lambda r: r["test_top1_err"]) if evaluated else None  # the first of equals
        return {
            "dataset": info.name,
            "data_source": info.source,
            "model": cfg["model"]["name"],
            "norm": cfg["model"]["norm"],
            "params": self.n_params,
            "final": None if last is None else {"top1_err": last["test_top1_err"], "top5_err": last["test_top5_err"],
                                                "epoch": last["epoch"]},
            "best": None if best is None else {"top1_err": best["test_top1_err"], "top5_err": best["test_top5_err"],
                                               "epoch": best["epoch"]},
            "best_selection": BEST_NOTE,
        }

    def epoch_line(self, row: dict[str, Any]) -> str:
        test = "" if row.get("test_top1_err") is None else (
            f" | test loss {row['test_loss']:.4f} top-1 err {row['test_top1_err']:.2f}% "
            f"top-5 err {row['test_top5_err']:.2f}%")
        return (f"epoch {row['epoch']:>3} | lr {row['lr']:.4g} | train loss {row['train_loss']:.4f} top-1 err "
                f"{row['train_top1_err']:.2f}%{test} | {row['epoch_time_s']:.1f}s, {row['images_per_s']:.0f} img/s")


def train(config: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Train into ``config["output"]["dir"]``, resuming from its checkpoint if there is one; returns the summary.

    Under torchrun every process calls this; the batch size is per process and rank 0 writes the run folder.
    """
    config = resolve_config(config)
    with threads(config["train"]["threads"]), process_group(config["train"]["device"]) as env:
        return fit(Classification, config, env, quiet)


def evaluate_checkpoint(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Test loss and top-1/top-5 error (%) of a checkpoint; ``overrides`` updates its config (e.g. data.root)."""
    state = load_checkpoint(path)
    if state.get("task", "classification") != "classification":
        raise ValueError(f"checkpoint {str(path)!r} holds a {state['task']} run; evaluate it with hypernorm "
                         f"detect-eval")
    config = resolve_config(merge_config(state["config"], overrides or {}))
    with threads(config["train"]["threads"]), process_group(config["train"]["device"]) as env:
        test_set, info = build_dataset(config["data"], train=False)
        model = create_model(config["model"]["name"], config["model"]["norm"],
                             config["model"]["num_classes"] or info.num_classes)
        load_weights(model, state["model"], path, f"model.name={config['model']['name']} model.norm="
                     f"{config['model']['norm']} with {config['model']['num_classes'] or info.num_classes} classes")
        model.to(env.device)
        loader = DataLoader(_shard(test_set, env), config["data"]["test_batch_size"] or config["train"]["batch_size"],
                            num_workers=config["data"]["workers"])
        result = evaluate(model, loader, Normalize(info.mean, info.std).to(env.device), env.device, env,
                          config["train"]["amp"], config["train"]["channels_last"], progress)
        status = state.get("status", "done" if state.get("done") else "running")
        return {"checkpoint": str(path), "epoch": state["epoch"], "status": status, "reason": state.get("reason"),
                "dataset": info.name, "data_source": info.source,
                "model": config["model"]["name"], "norm": config["model"]["norm"], **result}
