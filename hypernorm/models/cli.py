"""``hypernorm convert-plan MODEL``: what :func:`hypernorm.convert` would do to a model, before it does it;
``hypernorm convert-plan --families [--write docs/convert.md]``: the table of today's architectures."""
from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _norm_index(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # a norm's name inside the block, e.g. "bn2"


def _plan(args: argparse.Namespace) -> int:
    from . import create_model, model_info
    from .convert_table import family_rows, markdown_table, write_table
    from .external import convert_defaults, is_external
    from ..nn import explain

    if args.families:
        rows = family_rows()
        if args.write:
            write_table(args.write, rows)
        print(markdown_table(rows))
        return 0
    if not args.model:
        raise ValueError("convert-plan needs a MODEL (e.g. torchvision/mobilenet_v2, timm/convnext_atto, resnet50) "
                         "or --families")
    options = convert_defaults(args.model) if is_external(args.model) else dict(model_info(args.model).convert_options)
    if args.norm_index is not None:
        options["norm_index"] = args.norm_index
    print(explain(create_model(args.model, "bn", num_classes=args.num_classes), args.norm, **options))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert-plan", help="show where convert() puts HyperNorm in a model (a dry run)",
                              description="Print, per stage, the blocks, the norm chosen in each, its width, the "
                                          "blocks left out and why, and the parameters HyperNorm adds. Models are "
                                          "built with random weights; nothing is downloaded.")
    p.add_argument("model", nargs="?", help="a hypernorm model, timm/<name> or torchvision/<name>")
    p.add_argument("--norm", default="hn", help="'hn' (keep each norm's kind) or a HyperNorm name (default: hn)")
    p.add_argument("--norm-index", type=_norm_index, help="which norm of a block: position (0, -1) or name")
    p.add_argument("--num-classes", type=int, default=10, help="head size of the built model (default: 10)")
    p.add_argument("--families", action="store_true", help="convert and check every family of docs/convert.md")
    p.add_argument("--write", metavar="PATH", help="with --families: put the table into PATH between its markers")
    p.set_defaults(func=_plan)
