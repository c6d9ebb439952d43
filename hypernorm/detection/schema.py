"""Detection's config schema: every key with its default, the renamed keys of the previous release, and the checks.

The sections and shared keys are classification's (``optim.*``, ``train.grad_clip``, ``output.dir``, ...): one
loop trains both. No torch at import time.
"""
from __future__ import annotations

import copy
from typing import Any

from ..config import expect, flatten, load_config, merge_config, rename_keys
from ..engine.schema import check_common

__all__ = ["DEFAULT_DETECTION_CONFIG", "RENAMED_KEYS", "RESUMABLE_DIFFERENCES", "validate_detection_config",
           "load_detection_config", "resolve_detection_config", "ARCHS"]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")

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
        "device": "auto",  # auto (CUDA when available) | cpu | cuda
        "threads": None,  # torch CPU threads per process (null: torch's default)
        "amp": False,  # float16 autocast + GradScaler, CUDA only
        "grad_clip": None,  # max global L2 norm of the gradients, e.g. 10.0 for runs from random init
        "max_iters": None,  # stop after this many iterations in all (smoke runs)
        "eval": True,  # evaluate on the val split after every epoch
        "seed": 0,
        "deterministic": False,  # deterministic kernels (slower on CUDA)
        "allow_resize": False,  # resume with another world size or global batch (recorded in summary.json)
    },
    "optim": {
        "lr": 0.02,  # for `lr_batch` images per step; scaled linearly to the real global batch
        "lr_batch": 16,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "sched": "step",  # step | cosine
        "milestones": [8, 11],  # epochs after which lr is multiplied by gamma (step schedule)
        "gamma": 0.1,
        "min_lr": 0.0,  # cosine schedule floor
        "warmup_iters": 500,  # linear warm-up from warmup_start_factor * lr, per iteration
        "warmup_start_factor": 0.001,
    },
    "output": {
        "dir": "runs/detection",  # the run folder: config.yaml, metrics.csv, summary.json, checkpoint.pt
    },
}

# The keys of the previous release, accepted with a FutureWarning until the next one (None: no longer needed).
RENAMED_KEYS: dict[str, str | None] = {
    "train.lr": "optim.lr",
    "train.lr_batch": "optim.lr_batch",
    "train.momentum": "optim.momentum",
    "train.weight_decay": "optim.weight_decay",
    "train.milestones": "optim.milestones",
    "train.gamma": "optim.gamma",
    "train.warmup_iters": "optim.warmup_iters",
    "train.warmup_factor": "optim.warmup_start_factor",
    "train.clip_grad_norm": "train.grad_clip",
    "train.output": "output.dir",
    "train.resume": None,  # a run folder always resumes from its checkpoint, as in classification
    "train.log_every": None,  # the progress bar updates every iteration
}

RESUMABLE_DIFFERENCES = {"data.root", "data.workers", "output.dir", "train.device", "train.threads", "train.eval",
                         "train.allow_resize"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_detection_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every value a type check alone cannot; returns ``config``."""
    from ..nn import norm_names

    flat = flatten(config)
    check_common(flat)
    norms = ["frozenbn", *norm_names()]
    expect("model.backbone_norm", flat["model.backbone_norm"], flat["model.backbone_norm"] in norms,
           f"one of {', '.join(norms)}")
    expect("model.neck_norm", flat["model.neck_norm"], flat["model.neck_norm"] in ["none", *norm_names()],
           f"one of none, {', '.join(norm_names())}")
    expect("model.arch", flat["model.arch"], flat["model.arch"] in ARCHS, f"one of {', '.join(ARCHS)}")
    weights = flat["model.weights_backbone"]
    expect("model.weights_backbone", weights, weights is None or isinstance(weights, str),
           "a torchvision weights name, a checkpoint path or null")
    layers = flat["model.trainable_backbone_layers"]
    expect("model.trainable_backbone_layers", layers, layers is None or (_is_int(layers) and 0 <= layers <= 5),
           "an int in 0..5 or null")
    classes = flat["model.num_classes"]
    expect("model.num_classes", classes, classes is None or (_is_int(classes) and classes >= 2),
           "an int >= 2 or null")
    for key in ("model.min_size", "model.max_size"):
        expect(key, flat[key], flat[key] >= 1, "a positive number of pixels")
    expect("model.max_size", flat["model.max_size"], flat["model.max_size"] >= flat["model.min_size"],
           f"at least model.min_size={flat['model.min_size']}")
    for key in ("data.root", "data.train_images", "data.train_ann", "data.val_images", "data.val_ann"):
        expect(key, flat[key], isinstance(flat[key], str) and flat[key] != "", "a path")
    expect("data.hflip", flat["data.hflip"], 0 <= flat["data.hflip"] <= 1, "a probability in [0, 1]")
    for key in ("data.max_images", "train.max_iters"):
        expect(key, flat[key], flat[key] is None or (_is_int(flat[key]) and flat[key] >= 1), "a positive int or null")
    expect("optim.lr_batch", flat["optim.lr_batch"], flat["optim.lr_batch"] >= 1, "a positive int")
    expect("optim.warmup_iters", flat["optim.warmup_iters"], flat["optim.warmup_iters"] >= 0, "an int >= 0")
    return config


def load_detection_config(path: Any = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A detection config from a YAML file and ``key=value`` overrides (old key names still work, with a warning)."""
    return load_config(path, overrides, defaults=DEFAULT_DETECTION_CONFIG, validate=validate_detection_config,
                       renamed=RENAMED_KEYS)


def resolve_detection_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (partial, or saved by an older release) over the defaults, validated."""
    config = rename_keys(copy.deepcopy(config), RENAMED_KEYS, "detection config")
    return validate_detection_config(merge_config(DEFAULT_DETECTION_CONFIG, config, defaults=DEFAULT_DETECTION_CONFIG))
