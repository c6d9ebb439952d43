"""Collect run folders into Table-1 style tables: top-1 error mean +- std over seeds per setting."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = ["collect_runs", "summarize", "format_table", "write_tables", "GROUP_KEYS"]

GROUP_KEYS = ("dataset", "model", "norm", "batch")
METRICS = ("final_top1", "best_top1", "final_top5")
SORT_PRIORITY = ("dataset", "model", "batch", "norm")


def _lookup(config: dict, *dotted: str, default: Any = None) -> Any:
    for key in dotted:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per finished run folder below ``root`` (folders holding a ``summary.json`` with ``done``)."""
    rows = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        folder = summary_path.parent
        summary = json.loads(summary_path.read_text())
        if not summary.get("done"):
            continue
        config_path = folder / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        rows.append({
            "run": folder.name,
            "dataset": summary.get("dataset", _lookup(config, "data.dataset")),
            "model": _lookup(config, "model.name", default=summary.get("model")),
            "norm": _lookup(config, "model.norm", default=summary.get("norm")),
            "batch": int(summary.get("global_batch", _lookup(config, "train.batch_size", default=0))),
            "seed": _lookup(config, "train.seed", "seed"),
            "final_top1": float(summary["final"]["top1_err"]),
            "final_top5": float(summary["final"]["top5_err"]),
            "best_top1": float(summary["best"]["top1_err"]),
            "best_epoch": int(summary["best"]["epoch"]),
            "metrics": _read_metrics(folder / "metrics.csv"),
        })
    return rows


def summarize(rows: Iterable[dict[str, Any]], by: tuple[str, ...] = GROUP_KEYS) -> list[dict[str, Any]]:
    """Mean, sample standard deviation (n-1), min, max and count of each metric per group; groups sorted by
    data set, model, batch size (largest first) and norm (base norm before its HyperNorm form)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key), n=len(members))
        for metric in METRICS:
            values = [m[metric] for m in members]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        out.append(entry)
    order = sorted(by, key=lambda k: SORT_PRIORITY.index(k) if k in SORT_PRIORITY else len(SORT_PRIORITY))
    out.sort(key=lambda e: tuple(_sort_key(k, e[k]) for k in order))
    return out


def _sort_key(key: str, value: Any) -> tuple:
    if key == "batch":
        return (-int(value),)
    if key == "norm":
        return (str(value).endswith("hn"), str(value))
    return (str(value),)


def _pm(entry: dict, metric: str) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def format_table(summary: list[dict[str, Any]]) -> str:
    """Markdown in the layout of the paper's Table 1 (errors in %)."""
    lines = [
        "| Dataset | Architecture | Norm | Batch | Top-1 err. final (%) | Top-1 err. best epoch (%) | Top-5 err. final (%) | Seeds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        lines.append(f"| {e['dataset']} | {e['model']} | {str(e['norm']).upper()} | {e['batch']} | "
                     f"{_pm(e, 'final_top1')} | {_pm(e, 'best_top1')} | {_pm(e, 'final_top5')} | {e['n']} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """table.md and table.csv (per group), runs.csv (per run) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {"table.md": out_dir / "table.md", "table.csv": out_dir / "table.csv", "runs.csv": out_dir / "runs.csv"}
    paths["table.md"].write_text(format_table(summary))
    for name, records in (("table.csv", summary), ("runs.csv", [{k: v for k, v in r.items() if k != "metrics"}
                                                               for r in rows])):
        with paths[name].open("w", newline="") as f:
            if records:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
    return paths
