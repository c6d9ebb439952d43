"""The ``hypernorm`` command: a thin layer over the library; each subcommand lives beside the code it runs.

Building the parser imports no torch (the command modules load heavy code inside their functions), so
``hypernorm --help`` and a mistyped subcommand answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_parser(subparsers)``, whose parser sets ``func(args) -> int | None``.
COMMAND_MODULES: list[str] = [
    "hypernorm.analysis.commands",
    "hypernorm.analysis.complexity",
    "hypernorm.engine.cli",
    "hypernorm.detection.cli",
    "hypernorm.models.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypernorm", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value after an option (eval RUN --quiet data.root=...): argparse stops the positional list at the option
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .runtime import configure_cpu

    configure_cpu()  # allocator thresholds, OpenMP wait policy, threads: for every command, before torch loads
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError) as err:  # bad input (values, files): one clear line, no traceback
        message = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        print(f"hypernorm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
