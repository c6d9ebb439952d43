"""Collect run folders into Table-1 style tables: top-1 error mean +- std over seeds per setting.

A *setting* is the whole resolved config of a run except its seed and the keys that may differ on resume (where
data lives, workers, device, threads, output folder): runs pooled as "seeds" of one table row differ in nothing
else. Settings that differ in more than data set, model, norm and batch get a column for each key that varies.
Runs that are not finished (failed, running, interrupted, no summary) are never results: the report lists them
under "Not in the table" with the reason.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..config import flatten

__all__ = ["RunStatus", "RunCollection", "read_run_status", "collect_runs", "summarize", "format_table",
           "format_excluded", "write_tables", "setting_key", "varying_keys", "SEED_KEYS", "COLUMN_KEYS"]

METRICS = ("final_top1", "best_top1", "final_top5")
SORT_PRIORITY = ("dataset", "model", "batch", "norm")
SEED_KEYS = ("train.seed",)
# Config keys shown as the table's fixed columns (batch is the global batch, from summary.json).
COLUMN_KEYS = ("data.dataset", "model.name", "model.norm", "train.batch_size")
RUN_MARKERS = ("config.yaml", "summary.json", "run.json", "error.txt")


@dataclass
class RunStatus:
    """``status``: done | failed | running | missing (no readable summary.json); ``reason`` says why not done."""

    status: str
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


def _first_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[0] if lines else ""


def read_run_status(folder: str | Path) -> RunStatus:
    """The state of one run folder. A summary with ``done: true`` and no ``status`` (older runs) is done; an
    unfinished run with an ``error.txt`` (written by the experiment runner) failed."""
    folder = Path(folder)
    error = _first_line(folder / "error.txt")
    path = folder / "summary.json"
    if not path.is_file():
        return RunStatus("failed", error) if error else RunStatus("missing", "no summary.json")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return RunStatus("missing", f"summary.json unreadable ({err})")
    if not isinstance(summary, dict):
        return RunStatus("missing", "summary.json is not a mapping")
    status = summary.get("status") or ("done" if summary.get("done") else "running")
    if status == "done":
        return RunStatus("done", "", summary)
    if status == "failed" or error:
        return RunStatus("failed", summary.get("reason") or error or "failed", summary)
    progress = f"{summary.get('epochs_done', '?')}/{summary.get('epochs', '?')} epochs"
    return RunStatus(str(status), f"not finished ({progress})", summary)


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """Flat resolved config (defaults filled in) without the seed and the keys that may differ on resume."""
    from ..engine import RESUMABLE_DIFFERENCES

    flat = {**flatten(_defaults()), **flatten(config or {})}
    return {k: v for k, v in flat.items() if k not in SEED_KEYS and k not in RESUMABLE_DIFFERENCES}


def setting_key(config: dict[str, Any], drop: Iterable[str] = ()) -> tuple:
    """A hashable key of a flat config (lists and mappings compare by value), without the keys in ``drop``."""
    drop = set(drop)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in drop))


def varying_keys(configs: Iterable[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every one of ``configs``, in config order."""
    configs = list(configs)
    keys = dict.fromkeys(k for c in configs for k in c)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _defaults() -> dict[str, Any]:
    from ..engine import DEFAULT_CONFIG  # the classification schema; loaded when a report is made

    return DEFAULT_CONFIG


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


@dataclass
class RunCollection:
    rows: list[dict[str, Any]]  # one per finished run
    excluded: list[tuple[str, str]]  # (run folder, why it is not a result)


def _finite_errors(summary: dict[str, Any]) -> bool:
    try:
        values = [summary["final"]["top1_err"], summary["final"]["top5_err"], summary["best"]["top1_err"]]
        return all(math.isfinite(float(v)) for v in values)
    except (KeyError, TypeError, ValueError):
        return False


def collect_runs(root: str | Path) -> RunCollection:
    """One row per finished run folder below ``root``; every other run folder (a folder holding config.yaml,
    summary.json, run.json or error.txt) is listed in ``excluded`` with the reason."""
    root = Path(root)
    folders = sorted({p.parent for marker in RUN_MARKERS for p in root.rglob(marker)})
    rows, excluded = [], []
    for folder in folders:
        name = str(folder.relative_to(root)) if folder != root else folder.name
        state = read_run_status(folder)
        if state.status != "done":
            excluded.append((name, f"{state.status}: {state.reason}"))
            continue
        summary = state.summary
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            excluded.append((name, "done, but no config.yaml: the config that made it is unknown"))
            continue
        if not _finite_errors(summary):
            excluded.append((name, "done, but summary.json holds no finite final and best test errors"))
            continue
        config = yaml.safe_load(config_path.read_text()) or {}
        flat = {**flatten(_defaults()), **flatten(config)}
        rows.append({
            "run": name,
            "folder": str(folder),
            "dataset": summary.get("dataset", flat["data.dataset"]),
            "model": flat["model.name"],
            "norm": flat["model.norm"],
            "batch": int(summary.get("global_batch", flat["train.batch_size"])),
            "seed": flat["train.seed"],
            "final_top1": float(summary["final"]["top1_err"]),
            "final_top5": float(summary["final"]["top5_err"]),
            "best_top1": float(summary["best"]["top1_err"]),
            "best_epoch": int(summary["best"]["epoch"]),
            "config": comparable_config(config),
            "metrics": _read_metrics(folder / "metrics.csv"),
        })
    return RunCollection(*_drop_repeated_seeds(rows, excluded))


def _drop_repeated_seeds(rows: list[dict[str, Any]], excluded: list[tuple[str, str]]):
    """One run per setting and seed: a second folder of the same config and seed (a copied run) would count as
    another seed with std 0. The first folder (by path) stays; the others are listed."""
    first: dict[tuple, str] = {}
    kept = []
    for row in rows:
        key = (_group_key(row), json.dumps(row["seed"]))
        if key in first:
            excluded.append((row["run"], f"same config and seed ({row['seed']}) as {first[key]}: a copy, not "
                                         f"another seed"))
            continue
        first[key] = row["run"]
        kept.append(row)
    return kept, excluded


def _group_key(row: dict[str, Any]) -> tuple:
    return (row["dataset"], row["batch"], setting_key(row["config"]))


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation (n-1), min, max and count of each metric per setting (runs equal in all
    but the seed); each entry's ``differs`` holds its value of every config key that varies between settings
    beyond the fixed columns. Sorted by data set, model, batch size (largest first), norm (base norm first)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    shown = varying_keys(members[0]["config"] for members in groups.values())
    shown = [k for k in shown if k not in COLUMN_KEYS]
    out = []
    for members in groups.values():
        first = members[0]
        entry: dict[str, Any] = {k: first[k] for k in ("dataset", "model", "norm", "batch")}
        entry["differs"] = {k: first["config"].get(k) for k in shown}
        entry["n"] = len(members)
        entry["seeds"] = sorted(m["seed"] for m in members)
        for metric in METRICS:
            values = [m[metric] for m in members]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        out.append(entry)
    out.sort(key=lambda e: tuple(_sort_key(k, e[k]) for k in SORT_PRIORITY)
             + tuple(json.dumps(v, sort_keys=True) for v in e["differs"].values()))
    return out


def _sort_key(key: str, value: Any) -> tuple:
    if key == "batch":
        return (-int(value),)
    if key == "norm":
        return (*norm_order(str(value)), str(value))
    return (str(value),)


def norm_order(norm: str) -> tuple[bool, bool]:
    """Sort key: a base norm, then its HyperNorm form, then the no-relay ablation ("bhn_norelay")."""
    return norm.split("_")[0].endswith("hn"), "_" in norm


def norm_label(norm: str) -> str:
    """How tables, legends and figure titles name a norm: "bn" -> "BN", "bhn_norelay" -> "BHN, no relay"."""
    stem, _, ablation = norm.partition("_")
    return stem.upper() + (", no relay" if ablation == "norelay" else f"_{ablation}" if ablation else "")


def _pm(entry: dict, metric: str) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def format_table(summary: list[dict[str, Any]]) -> str:
    """Markdown in the layout of the paper's Table 1 (errors in %), plus one column per other varying key."""
    extra = list(summary[0]["differs"]) if summary else []
    lines = [
        "| Dataset | Architecture | Norm | Batch | " + "".join(f"{k} | " for k in extra)
        + "Top-1 err. final (%) | Top-1 err. best epoch (%) | Top-5 err. final (%) | Seeds |",
        "|---|---|---|---:|" + "---|" * len(extra) + "---:|---:|---:|---:|",
    ]
    for e in summary:
        cells = "".join(f"{_cell(e['differs'][k])} | " for k in extra)
        lines.append(f"| {e['dataset']} | {e['model']} | {norm_label(str(e['norm']))} | {e['batch']} | {cells}"
                     f"{_pm(e, 'final_top1')} | {_pm(e, 'best_top1')} | {_pm(e, 'final_top5')} | {e['n']} |")
    return "\n".join(lines) + "\n"


def format_excluded(excluded: list[tuple[str, str]]) -> str:
    """The "Not in the table" note: one line per run folder that is not a result."""
    if not excluded:
        return ""
    return f"\nNot in the table ({len(excluded)} run(s)):\n" + "".join(f"- {name}: {why}\n" for name, why in excluded)


def write_tables(runs: RunCollection, out_dir: str | Path) -> dict[str, Path]:
    """table.md (with the "Not in the table" note) and table.csv (per setting), runs.csv (per run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs.rows)
    paths = {"table.md": out_dir / "table.md", "table.csv": out_dir / "table.csv", "runs.csv": out_dir / "runs.csv"}
    paths["table.md"].write_text(format_table(summary) + format_excluded(runs.excluded))
    table_records = [{**{k: v for k, v in e.items() if k not in ("differs", "seeds")}, **e["differs"],
                      "seeds": " ".join(map(str, e["seeds"]))} for e in summary]
    run_records = [{k: v for k, v in r.items() if k not in ("metrics", "config", "folder")} for r in runs.rows]
    for name, records in (("table.csv", table_records), ("runs.csv", run_records)):
        with paths[name].open("w", newline="") as f:
            if records:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
    return paths
