"""``hypernorm train -c CONFIG [key=value ...]`` and ``hypernorm eval CHECKPOINT [key=value ...]``."""
from __future__ import annotations

import argparse
import os
from typing import Any

import sys

from ..config import load_config, parse_overrides

__all__ = ["add_parser", "add_training_parser", "format_result_table"]


def format_result_table(summary: dict[str, Any]) -> str:
    """Final and best test errors, labelled, with the data set and batch they came from."""
    lines = [f"{summary['model']} / {summary['norm']} on {summary['dataset']} (global batch {summary['global_batch']}"
             f" = {summary['world_size']} x {summary['batch_size_per_process']}, {summary['epochs_done']}/"
             f"{summary['epochs']} epochs)",
             f"{'':<14}{'top-1 err (%)':>15}{'top-5 err (%)':>15}{'epoch':>7}"]
    for label, key in (("final epoch", "final"), ("best epoch *", "best")):
        entry = summary.get(key)
        if entry:
            lines.append(f"{label:<14}{entry['top1_err']:>15.2f}{entry['top5_err']:>15.2f}{entry['epoch']:>7}")
    lines.append(f"* {summary['best_selection']}")
    if summary.get("mean_epoch_time_s"):
        lines.append(f"mean epoch time {summary['mean_epoch_time_s']:.1f}s, {summary['mean_images_per_s']:.0f} "
                     f"train images/s on {summary['device']}; run folder {summary['run_dir']}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from .loop import TrainingDiverged  # torch is imported by the commands that use it, not by --help
    from .trainer import train

    config = load_config(args.config, args.overrides)
    try:
        summary = train(config, quiet=args.quiet)
    except TrainingDiverged as err:  # recorded as failed in the run folder; one line, no traceback
        print(f"hypernorm {args.command}: error: {err}", file=sys.stderr)
        return 1
    if _is_rank0():
        print(format_result_table(summary))
    return 0


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun only the first process prints results


def _eval(args: argparse.Namespace) -> int:
    from .trainer import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, parse_overrides(args.overrides), progress=not args.quiet)
    if _is_rank0():
        print(f"{result['model']} / {result['norm']} on {result['dataset']}, checkpoint of epoch {result['epoch']} "
              f"({result['count']} test images)\n"
              f"test loss {result['loss']:.4f} | top-1 err {result['top1_err']:.2f}% | top-5 err "
              f"{result['top5_err']:.2f}%")
    return 0


def add_training_parser(subparsers: argparse._SubParsersAction, name: str, func, help: str, config_help: str,
                        overrides_help: str) -> None:
    """A command of the shared loop (train, detect-train): a config, key=value overrides, --quiet."""
    p = subparsers.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}, resuming from its "
                              f"checkpoint.pt if there is one. Launch with torchrun for DDP; train.batch_size is per "
                              f"process.")
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    p.set_defaults(func=func)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_training_parser(subparsers, "train", _train, "train a classifier (CIFAR, ImageNet) into output.dir",
                        "YAML config (see configs/); keys not in it keep their defaults",
                        "e.g. model.norm=bhn optim.lr=0.05")

    p = subparsers.add_parser("eval", help="evaluate a checkpoint on its test set")
    p.add_argument("checkpoint", help="a checkpoint.pt or the run folder holding it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=... data.test_batch_size=256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)
