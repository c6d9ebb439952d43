"""Training and evaluation of the detectors: config, data loaders, SGD 1x schedule, DDP, checkpoints, run folder.

A run folder (``train.output``) holds ``config.yaml`` (the resolved config), ``summary.jsonl`` (one line per
epoch: losses, learning rate, COCO metrics, time) and ``last.pth`` (written atomically after every epoch; the
run resumes from it with ``train.resume=true``).
"""
from __future__ import annotations

import json
import math
import os
import time
from bisect import bisect_right
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from ..engine.checkpoint import save_checkpoint
from ..engine.distributed import setup_distributed
from ..nn import use_cpu_sync_batchnorm
from .data import CocoDetection, collate, detection_transforms
from .evaluate import evaluate, format_table
from .model import create_detector

__all__ = ["DEFAULT_DETECTION_CONFIG", "build_model", "build_loader", "train", "evaluate_checkpoint"]

# Every valid key of a detection config, loaded with
# ``hypernorm.config.load_config(path, overrides, defaults=DEFAULT_DETECTION_CONFIG)``.
# The standard 1x schedule of Detectron/torchvision for 16 images per step: 12 epochs, lr 0.02 divided by 10
# after epochs 8 and 11, linear warm-up over 500 iterations, 800-pixel shorter side.
DEFAULT_DETECTION_CONFIG: dict[str, Any] = {
    "model": {
        "backbone_norm": "frozenbn",  # frozenbn or any registered norm (bn, syncbn, gn, sn, bhn, ...)
        "neck_norm": "none",  # none (plain FPN, two-FC box head) or any registered norm (FPN + 4conv1fc head)
        "arch": "resnet50",  # resnet18 | resnet34 | resnet50 | resnet101
        "weights_backbone": None,  # online: "IMAGENET1K_V1" (BN-type backbones) or a checkpoint path
        "trainable_backbone_layers": None,  # 0-5 stages from the top; null: 3 with pretrained weights, else 5
        "num_classes": None,  # null: the largest category id of the training set + 1 (91 for COCO)
        "min_size": 800,  # shorter image side after resizing (pixels)
        "max_size": 1333,  # longer side at most
        "kwargs": {},  # more torchvision FasterRCNN arguments, any keys; set whole: model.kwargs={key: value}
    },
    "data": {
        "root": "data/coco",  # the paths below are relative to it (or absolute)
        "train_images": "train2017",  # image folder of the training split
        "train_ann": "annotations/instances_train2017.json",  # its COCO annotation file
        "val_images": "val2017",  # image folder of the evaluation split
        "val_ann": "annotations/instances_val2017.json",
        "hflip": 0.5,  # probability of a horizontal flip in training
        "workers": 4,  # DataLoader worker processes per training process
        "max_images": None,  # first N images of each split (quick runs)
    },
    "train": {
        "epochs": 12,
        "batch_size": 2,  # images per process
        "lr": 0.02,  # for `lr_batch` images per step; scaled linearly to the real total batch
        "lr_batch": 16,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "milestones": [8, 11],  # epochs after which lr is multiplied by gamma
        "gamma": 0.1,
        "warmup_iters": 500,  # linear warm-up from warmup_factor * lr, per iteration
        "warmup_factor": 0.001,
        "max_iters": None,  # stop after this many iterations (smoke runs)
        "clip_grad_norm": None,  # e.g. 10.0 for runs from random init, whose first steps can blow up
        "amp": False,  # autocast + GradScaler
        "eval": True,  # evaluate on the val split after every epoch
        "log_every": 20,  # iterations between progress-bar updates
        "seed": 0,
        "device": "auto",  # auto (CUDA when available) | cpu | cuda
        "output": "runs/detection",  # the run folder: config.yaml, summary.jsonl, last.pth
        "resume": False,  # continue from output/last.pth when it exists
    },
}


def build_model(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    m = cfg["model"]
    return create_detector(
        m["backbone_norm"], m["neck_norm"], m["num_classes"] or num_classes, arch=m["arch"],
        weights_backbone=m["weights_backbone"], trainable_backbone_layers=m["trainable_backbone_layers"],
        min_size=m["min_size"], max_size=m["max_size"], **m["kwargs"])


def build_dataset(cfg: dict[str, Any], split: str) -> CocoDetection:
    d = cfg["data"]
    return CocoDetection(os.path.join(d["root"], d[f"{split}_images"]), os.path.join(d["root"], d[f"{split}_ann"]),
                         detection_transforms(split == "train", d["hflip"]), d["max_images"])


def build_loader(dataset: CocoDetection, cfg: dict[str, Any], train: bool, world_size: int) -> DataLoader:
    if world_size > 1:
        sampler = DistributedSampler(dataset, shuffle=train, seed=cfg["train"]["seed"])
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=cfg["train"]["batch_size"] if train else 1, sampler=sampler,
                      num_workers=cfg["data"]["workers"], collate_fn=collate, drop_last=train)


def _lr_lambda(warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float):
    def factor(iteration: int) -> float:
        warm = 1.0
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * gamma ** bisect_right(milestones, iteration)

    return factor


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (and evaluate after each epoch); returns the last epoch's summary. Runs under torchrun as well."""
    t = cfg["train"]
    env = setup_distributed(t["device"])  # joins the process group under torchrun (NCCL on CUDA, gloo on CPU)
    rank, world_size, device = env.rank, env.world_size, env.device
    torch.manual_seed(t["seed"] + rank)
    main = rank == 0

    train_set = build_dataset(cfg, "train")
    train_loader = build_loader(train_set, cfg, True, world_size)
    if len(train_loader) == 0:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch per process "
                         f"({t['batch_size']} x {world_size})")
    val_set = build_dataset(cfg, "val") if t["eval"] else None
    val_loader = build_loader(val_set, cfg, False, world_size) if val_set is not None else None

    model = build_model(cfg, train_set.num_classes).to(device)
    if world_size > 1 and device.type == "cpu":
        use_cpu_sync_batchnorm(model)  # torch's SyncBatchNorm syncs only CUDA tensors (and DDP refuses it on CPU)
    core = model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    total_batch = t["batch_size"] * world_size
    lr = t["lr"] * total_batch / t["lr_batch"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=t["momentum"], weight_decay=t["weight_decay"])
    iters_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(
        t["warmup_iters"], t["warmup_factor"], [m * iters_per_epoch for m in t["milestones"]], t["gamma"]))
    scaler = torch.amp.GradScaler(device.type, enabled=t["amp"])

    out = t["output"]
    ckpt_path = os.path.join(out, "last.pth")
    start_epoch, iteration = 0, 0
    if t["resume"] and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, iteration = state["epoch"] + 1, state["iteration"]
    if main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        print(f"detect-train: {cfg['model']['backbone_norm']}/{cfg['model']['neck_norm']} {cfg['model']['arch']}, "
              f"{len(train_set)} images, {world_size} process(es) x {t['batch_size']}, lr {lr:g}, device {device}")

    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, t["epochs"]):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        steps, start = 0, time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not main, leave=False)
        for images, targets in bar:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in tg.items()} for tg in targets]
            with torch.autocast(device.type, enabled=t["amp"]):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}: "
                                         f"{ {k: v.item() for k, v in losses.items()} }; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t["clip_grad_norm"] is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(core.parameters(), t["clip_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            steps += 1
            for k, v in [("loss", loss), *losses.items()]:
                sums[k] = sums.get(k, 0.0) + v.item()
            if main and iteration % t["log_every"] == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
            if t["max_iters"] is not None and iteration >= t["max_iters"]:
                break
        summary = {"epoch": epoch + 1, "iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                   **{k: v / max(steps, 1) for k, v in sums.items()}, "train_s": time.time() - start,
                   "world_size": world_size}
        if val_loader is not None:
            start = time.time()
            summary.update(evaluate(core, val_loader, val_set.coco, device))  # DDP keeps core's buffers in sync
            summary["eval_s"] = time.time() - start
        if main:
            save_checkpoint(ckpt_path, {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                        "epoch": epoch, "iteration": iteration, "config": cfg})
            with open(os.path.join(out, "summary.jsonl"), "a") as f:
                f.write(json.dumps(summary) + "\n")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        if t["max_iters"] is not None and iteration >= t["max_iters"]:
            break
    if main and val_loader is not None and "AP" in summary:
        print(format_table([(cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"], summary)]))
    return summary


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str | None = None, verbose: bool = True) -> dict[str, float]:
    """COCO metrics of a trained detector on the val split; prints Table 2's layout on rank 0."""
    env = setup_distributed(cfg["train"]["device"])
    rank, world_size, device = env.rank, env.world_size, env.device
    val_set = build_dataset(cfg, "val")
    model = build_model(cfg, val_set.num_classes)
    checkpoint = checkpoint or os.path.join(cfg["train"]["output"], "last.pth")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; train first or pass --checkpoint")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"] if "model" in state else state)
    model.to(device)
    metrics = evaluate(model, build_loader(val_set, cfg, False, world_size), val_set.coco, device,
                       verbose=verbose and rank == 0)
    if rank == 0:
        print(format_table([(cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"], metrics)]))
    return metrics
