"""``hypernorm detect-train`` and ``hypernorm detect-eval`` (both run under torchrun for DDP)."""
from __future__ import annotations

import argparse

from ..config import apply_overrides, load_config, merge_config


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist  # here, not at the top: building the parser must not load torch

    from .engine import DEFAULT_DETECTION_CONFIG, train

    try:
        train(load_config(args.config, args.overrides, defaults=DEFAULT_DETECTION_CONFIG))
    finally:
        if dist.is_initialized():  # joined by the engine under torchrun
            dist.destroy_process_group()
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .engine import DEFAULT_DETECTION_CONFIG, evaluate_checkpoint

    if args.config is None and args.checkpoint is None:
        raise ValueError("give -c CONFIG (evaluates CONFIG's train.output/last.pth) or --checkpoint PATH")
    defaults = DEFAULT_DETECTION_CONFIG
    if args.config is None:  # the checkpoint knows the model it holds and the data it was evaluated on
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False).get("config") or {}
        cfg = apply_overrides(merge_config(defaults, saved, defaults=defaults), args.overrides, defaults)
    else:
        cfg = load_config(args.config, args.overrides, defaults=defaults)
    try:
        evaluate_checkpoint(cfg, args.checkpoint)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect-train", help="train Faster R-CNN R50-FPN with a backbone/neck norm pair on COCO",
                              description="Train a detector (configs/detection/*.yaml); key=value overrides the config.")
    p.add_argument("-c", "--config", help="YAML config, e.g. configs/detection/faster_rcnn_r50_fpn_1x_bhn_bhn.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=/data/coco train.max_iters=10")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("detect-eval", help="COCO bbox AP of a trained detector (Table 2 layout)",
                              description="Evaluate a detector checkpoint on the val split with pycocotools.")
    p.add_argument("-c", "--config", help="YAML config; default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", help="default: train.output/last.pth of the config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_eval)
