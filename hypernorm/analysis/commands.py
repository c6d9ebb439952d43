"""``hypernorm experiment`` (run a grid, then report) and ``hypernorm report`` (tables and figures only).

Imports only what parsing needs; the runner, the engine and matplotlib load when a command runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def report(root: str | Path, out_dir: str | Path | None = None) -> str:
    """Write table.md/csv, runs.csv, and the figures for every model found below ``root``; return the table.
    Run folders that are not finished results are listed under the table ("Not in the table")."""
    from .aggregate import collect_runs, write_tables
    from .diagnostics import write_relay_figures
    from .plots import plot_batch_size, plot_curves

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {str(root)!r} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    runs = collect_runs(root)
    if not runs.rows:
        unfinished = "; ".join(f"{name}: {why}" for name, why in runs.excluded[:3])
        more = f"; {len(runs.excluded) - 3} more" if len(runs.excluded) > 3 else ""
        raise ValueError(f"no finished runs below {str(root)!r} (a finished run folder has config.yaml and a "
                         f"summary.json with status done)" + (f"; not finished: {unfinished}{more}" if unfinished
                                                              else ""))
    paths = write_tables(runs, out_dir)
    for model in dict.fromkeys(r["model"] for r in runs.rows):
        batches = sorted({r["batch"] for r in runs.rows if r["model"] == model})
        if any(r["metrics"] for r in runs.rows if r["model"] == model and r["batch"] == batches[-1]):
            plot_curves(runs.rows, out_dir / f"curves_{model}_bs{batches[-1]}.png", model, batches[-1])
        if len(batches) > 1:
            plot_batch_size(runs.rows, out_dir / f"error_vs_batch_{model}.png", model)
    write_relay_figures(root, out_dir)
    table = paths["table.md"].read_text()
    print(table)
    print(f"tables and figures in {out_dir}")
    return table


def _experiment(args: argparse.Namespace) -> int:
    from .runner import load_grid, run_grid, usable_workers

    usable_workers(args.workers)  # a bad value is an error before anything runs
    grid = load_grid(args.config, args.overrides, args.output_dir)
    result = run_grid(grid, dry_run=args.dry_run, workers=args.workers)
    if args.dry_run:
        return 1 if any(p.state in ("conflict", "failed") for p in result.planned) else 0
    try:
        report(grid["output_dir"])
    except ValueError as err:  # nothing finished yet: the failures below say why
        print(f"hypernorm experiment: no report: {err}", file=sys.stderr)
    for line in result.failures:
        print(f"hypernorm experiment: run failed: {line}", file=sys.stderr)
    if result.failures:
        print(f"hypernorm experiment: {len(result.failures)} of {len(result.planned)} run(s) failed",
              file=sys.stderr)
    return 1 if result.failures else 0


def _report(args: argparse.Namespace) -> int:
    report(args.runs, args.out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    exp = subparsers.add_parser(
        "experiment", help="run an experiment grid (resumable), then write its report",
        description="Train every run of a grid that is not done, then write the report. A run folder whose "
                    "config.yaml differs from the run's resolved config (e.g. other overrides) is refused, "
                    "naming the differing keys: use --output-dir for a new config. Exit code 1 if a run failed.")
    exp.add_argument("-c", "--config", required=True, help="grid YAML file (see configs/experiments/)")
    exp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    exp.add_argument("--dry-run", action="store_true",
                     help="list each run as done, to run, running (another process), failed or conflict, and "
                          "stop (exit code 1 if any run failed or conflicts)")
    exp.add_argument("--workers", default="auto", metavar="N|auto",
                     help="runs trained at once, each in its own process with one torch thread unless "
                          "train.threads is set, its output in the run folder's train.log (default auto: the "
                          "usable cores, or 1 when the runs train on a GPU; 1: one run after the other in this process, "
                          "torch's thread count)")
    exp.add_argument("--output-dir", default=None, help="folder for the run folders (default: the grid's)")
    exp.set_defaults(func=_experiment)
    rep = subparsers.add_parser("report", help="tables (mean ± std over seeds) and figures from run folders")
    rep.add_argument("runs", help="folder holding run folders")
    rep.add_argument("--out", default=None, help="output folder (default: RUNS/report)")
    rep.set_defaults(func=_report)
