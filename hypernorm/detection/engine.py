"""Training and evaluation of the detectors: detection's part of the shared loop (:mod:`hypernorm.engine.loop`).

Detection supplies the model, the COCO data, the loss of a batch (the sum of Faster R-CNN's losses) and the COCO
evaluation; the loop does the rest, exactly as for classification. A run folder (``output.dir``) holds
``config.yaml``, ``metrics.csv`` (one row per epoch: losses, learning rate, COCO metrics, time), ``summary.json``
and ``checkpoint.pt``; a rerun into it resumes from the checkpoint and refuses a different config.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..engine.checkpoint import read_checkpoint
from ..engine.distributed import process_group
from ..engine.loop import Task, TrainParts, fit, threads
from ..nn import use_cpu_sync_batchnorm
from .data import CocoDetection, collate, detection_transforms
from .evaluate import METRICS, evaluate, format_table
from .model import create_detector
from .schema import DEFAULT_DETECTION_CONFIG, RESUMABLE_DIFFERENCES, resolve_detection_config

__all__ = ["DEFAULT_DETECTION_CONFIG", "Detection", "build_model", "build_dataset", "train", "evaluate_checkpoint"]

LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")  # torchvision's Faster R-CNN


def _faster_rcnn_arguments() -> set[str]:
    """What model.kwargs may set: FasterRCNN's arguments and its transform's (which would swallow any other key)."""
    names = set()
    for function in (FasterRCNN.__init__, GeneralizedRCNNTransform.__init__):
        names |= {p.name for p in inspect.signature(function).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD}
    return names - {"self", "backbone", "num_classes", "box_head", "min_size", "max_size"}


def build_model(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    m = cfg["model"]
    unknown = sorted(set(m["kwargs"]) - _faster_rcnn_arguments())
    if unknown:
        raise ValueError(f"config key 'model.kwargs' expects arguments of torchvision's FasterRCNN "
                         f"({', '.join(sorted(_faster_rcnn_arguments()))}), got {', '.join(unknown)}")
    return create_detector(
        m["backbone_norm"], m["neck_norm"], m["num_classes"] or num_classes, arch=m["arch"],
        weights_backbone=m["weights_backbone"], trainable_backbone_layers=m["trainable_backbone_layers"],
        min_size=m["min_size"], max_size=m["max_size"], **m["kwargs"])


def build_dataset(cfg: dict[str, Any], split: str) -> CocoDetection:
    d = cfg["data"]
    return CocoDetection(os.path.join(d["root"], d[f"{split}_images"]), os.path.join(d["root"], d[f"{split}_ann"]),
                         detection_transforms(split == "train", d["hflip"]), d["max_images"])


def _val_loader(dataset: CocoDetection, cfg: dict[str, Any], world_size: int) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=False) if world_size > 1 else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=cfg["data"]["workers"], collate_fn=collate)


def _check_classes(cfg: dict[str, Any], dataset: CocoDetection) -> None:
    classes = cfg["model"]["num_classes"]
    if classes is not None and classes < dataset.num_classes:
        raise ValueError(f"config key 'model.num_classes' expects at least {dataset.num_classes} (the largest "
                         f"category id of {cfg['data']['train_ann']} + 1), got {classes}")


class Detection(Task):
    kind = "detection"
    metric_fields = ["epoch", "iteration", "lr", "train_loss", *LOSSES, *METRICS, "epoch_time_s", "images_per_s"]
    resumable_differences = RESUMABLE_DIFFERENCES

    def base_lr(self, global_batch: int) -> float:
        optim = self.config["optim"]
        return optim["lr"] * global_batch / optim["lr_batch"]  # linear scaling to the real global batch

    def build(self) -> TrainParts:
        cfg, env = self.config, self.env
        train_set = build_dataset(cfg, "train")
        _check_classes(cfg, train_set)
        self.train_size = len(train_set)
        self.val_set = build_dataset(cfg, "val") if cfg["train"]["eval"] else None
        model = build_model(cfg, train_set.num_classes).to(env.device)
        if env.distributed and env.device.type == "cpu":
            use_cpu_sync_batchnorm(model)  # torch's SyncBatchNorm syncs only CUDA tensors (and DDP refuses it on CPU)
        self.n_params = sum(p.numel() for p in model.parameters())
        # a DistributedSampler also for one process: the order depends only on (seed, epoch), so a resumed run
        # sees the images a straight one would
        sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=cfg["train"]["seed"])
        loader = DataLoader(train_set, cfg["train"]["batch_size"], sampler=sampler,
                            num_workers=cfg["data"]["workers"], collate_fn=collate, drop_last=True)
        return TrainParts(model, loader, sampler, cfg["train"]["batch_size"])

    def describe(self, parts: TrainParts, iters: int, global_batch: int) -> str:
        m = self.config["model"]
        return (f"detect-train: {m['backbone_norm']}/{m['neck_norm']} {m['arch']} ({self.n_params / 1e6:.2f}M "
                f"params), {self.train_size} images, {self.env.world_size} process(es) x "
                f"{self.config['train']['batch_size']} = global batch {global_batch}, lr "
                f"{self.base_lr(global_batch):g}, {iters} iterations/epoch, device {self.env.device}")

    def train_step(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.env.device
        images, targets = batch
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in tg.items()} for tg in targets]
        losses = net(images, targets)
        loss = sum(losses.values())
        values = {"train_loss": loss.detach(), "steps": torch.ones((), device=device)}
        values.update({k: v.detach() for k, v in losses.items()})
        return loss, values

    def train_stats(self, sums: dict[str, float]) -> dict[str, float]:
        steps = sums.pop("steps")
        return {k: v / steps for k, v in sums.items()}  # means per iteration over all processes

    def evaluate(self, net: nn.Module, epoch: int, last: bool, progress: bool) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        # DDP keeps the wrapped model's buffers in sync, so the plain model evaluates
        return evaluate(net, _val_loader(self.val_set, self.config, self.env.world_size), self.val_set.coco,
                        self.env.device)

    def summary_fields(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        m = self.config["model"]
        evaluated = [r for r in history if r.get("AP") is not None]
        last = evaluated[-1] if evaluated else None
        return {
            "task": "detection",
            "backbone_norm": m["backbone_norm"],
            "neck_norm": m["neck_norm"],
            "arch": m["arch"],
            "params": self.n_params,
            "train_images": self.train_size,
            "train_loss": history[-1]["train_loss"] if history else None,
            "final": None if last is None else {**{k: last[k] for k in METRICS}, "epoch": last["epoch"]},
        }


def _refuse_old_run_folder(cfg: dict[str, Any]) -> None:
    out = Path(cfg["output"]["dir"])
    if (out / "last.pth").is_file() and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"run folder {out} holds last.pth of an older release, which does not resume in this one; "
                         f"evaluate it with hypernorm detect-eval --checkpoint {out / 'last.pth'}, or use another "
                         f"output.dir")


def train(cfg: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Train (and evaluate after each epoch) into ``output.dir``, resuming from its checkpoint; returns the
    summary. Runs under torchrun as well."""
    cfg = resolve_detection_config(cfg)
    _refuse_old_run_folder(cfg)
    with threads(cfg["train"]["threads"]), process_group(cfg["train"]["device"]) as env:
        summary = fit(Detection, cfg, env, quiet)
        if env.is_main and not quiet and summary.get("final"):
            print(format_table([(cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"], summary["final"])]))
    return summary


def load_detector_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state_dict, saved config or None) of a detection checkpoint: a run's, an older release's last.pth, or a
    bare state_dict; loaded with weights_only."""
    path, state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a detector checkpoint (holds a {type(state).__name__})")
    if state.get("task", "detection") != "detection":
        raise ValueError(f"checkpoint {str(path)!r} holds a {state['task']} run; evaluate it with hypernorm eval")
    if "model" in state:
        return state["model"], state.get("config")
    if all(torch.is_tensor(v) for v in state.values()):
        return state, None
    raise ValueError(f"checkpoint {str(path)!r} is not a detector checkpoint (no model entry)")


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str | os.PathLike | None = None,
                        verbose: bool = True) -> dict[str, float]:
    """COCO metrics of a trained detector on the val split; prints Table 2's layout on rank 0."""
    cfg = resolve_detection_config(cfg)
    checkpoint = checkpoint or os.path.join(cfg["output"]["dir"], "checkpoint.pt")
    weights, _ = load_detector_checkpoint(checkpoint)
    with threads(cfg["train"]["threads"]), process_group(cfg["train"]["device"]) as env:
        val_set = build_dataset(cfg, "val")
        model = build_model(cfg, val_set.num_classes)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit the configured detector "
                             f"({str(err).splitlines()[0]}); pass the config it was trained with") from None
        model.to(env.device)
        metrics = evaluate(model, _val_loader(val_set, cfg, env.world_size), val_set.coco, env.device,
                           verbose=verbose and env.is_main)
        if env.is_main:
            print(format_table([(cfg["model"]["backbone_norm"], cfg["model"]["neck_norm"], metrics)]))
    return metrics
