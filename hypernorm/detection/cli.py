"""``hypernorm detect-train`` and ``hypernorm detect-eval`` (both run under torchrun for DDP)."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..engine.cli import add_training_parser
from .schema import load_detection_config


def _load(args: argparse.Namespace) -> dict:
    """The config, with each renamed key's deprecation as one line (not a warning's source listing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        config = load_detection_config(args.config, args.overrides)
    for warning in caught:
        print(f"hypernorm {args.command}: warning: {warning.message}", file=sys.stderr)
    return config


def _train(args: argparse.Namespace) -> int:
    from ..engine.loop import TrainingDiverged  # torch is imported by the commands that use it, not by --help
    from .engine import train

    try:
        train(_load(args), quiet=args.quiet)
    except TrainingDiverged as err:  # recorded as failed in the run folder; one line, no traceback
        print(f"hypernorm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..config import apply_overrides, rename_overrides
    from .engine import evaluate_checkpoint, load_detector_checkpoint
    from .schema import DEFAULT_DETECTION_CONFIG, RENAMED_KEYS, resolve_detection_config

    if args.config is None and args.checkpoint is None:
        raise ValueError("give -c CONFIG (evaluates the checkpoint.pt of CONFIG's output.dir) or --checkpoint PATH")
    if args.config is None:  # the checkpoint knows the model it holds and the data it was evaluated on
        _, saved = load_detector_checkpoint(args.checkpoint)
        if saved is None:
            raise ValueError(f"checkpoint {args.checkpoint!r} holds weights only; pass -c CONFIG to say which "
                             f"detector they belong to")
        overrides = rename_overrides(args.overrides, RENAMED_KEYS)
        cfg = resolve_detection_config(apply_overrides(resolve_detection_config(saved), overrides,
                                                       DEFAULT_DETECTION_CONFIG))
    else:
        cfg = _load(args)
    evaluate_checkpoint(cfg, args.checkpoint)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_training_parser(subparsers, "detect-train", _train,
                        "train Faster R-CNN R50-FPN with a backbone/neck norm pair on COCO into output.dir",
                        "YAML config, e.g. configs/detection/faster_rcnn_r50_fpn_1x_bhn_bhn.yaml",
                        "e.g. data.root=/data/coco train.max_iters=10")

    p = subparsers.add_parser("detect-eval", help="COCO bbox AP of a trained detector (Table 2 layout)",
                              description="Evaluate a detector checkpoint on the val split with pycocotools.")
    p.add_argument("-c", "--config", help="YAML config; default: the config stored in the checkpoint")
    p.add_argument("--checkpoint", help="default: checkpoint.pt in the config's output.dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_eval)
