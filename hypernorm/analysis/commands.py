"""``hypernorm experiment`` (run a grid, then report) and ``hypernorm report`` (tables and figures only)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .aggregate import collect_runs, write_tables
from .diagnostics import write_relay_figures
from .plots import plot_batch_size, plot_curves
from .runner import load_grid, run_grid


def report(root: str | Path, out_dir: str | Path | None = None) -> str:
    """Write table.md/csv, runs.csv, and the figures for every model found below ``root``; return the table."""
    out_dir = Path(out_dir) if out_dir is not None else Path(root) / "report"
    rows = collect_runs(root)
    if not rows:
        raise ValueError(f"no finished runs below {str(root)!r} (a finished run folder has summary.json with done)")
    paths = write_tables(rows, out_dir)
    for model in dict.fromkeys(r["model"] for r in rows):
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        plot_curves(rows, out_dir / f"curves_{model}_bs{batches[-1]}.png", model, batches[-1])
        if len(batches) > 1:
            plot_batch_size(rows, out_dir / f"error_vs_batch_{model}.png", model)
    write_relay_figures(root, out_dir)
    table = paths["table.md"].read_text()
    print(table)
    print(f"tables and figures in {out_dir}")
    return table


def _experiment(args: argparse.Namespace) -> int:
    grid = load_grid(args.config, args.overrides)
    run_grid(grid, dry_run=args.dry_run)
    if not args.dry_run:
        report(grid["output_dir"])
    return 0


def _report(args: argparse.Namespace) -> int:
    report(args.runs, args.out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    exp = subparsers.add_parser("experiment", help="run an experiment grid (resumable), then write its report")
    exp.add_argument("-c", "--config", required=True, help="grid YAML file (see configs/experiments/)")
    exp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    exp.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    exp.set_defaults(func=_experiment)
    rep = subparsers.add_parser("report", help="tables (mean ± std over seeds) and figures from run folders")
    rep.add_argument("runs", help="folder holding run folders")
    rep.add_argument("--out", default=None, help="output folder (default: RUNS/report)")
    rep.set_defaults(func=_report)
