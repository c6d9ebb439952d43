"""The paper's analysis figures from run folders: training curves (Figure 2), error vs batch size (Figure 3).

Only runs of one setting (equal resolved configs but for the seed) are averaged: where the selected runs of one
norm differ in anything else, each setting is its own line, labelled with the keys that differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: works headless, whatever the backend

from .aggregate import norm_label, norm_order, setting_key, varying_keys

__all__ = ["plot_curves", "plot_batch_size"]

NORM_COLORS = {"bn": "tab:blue", "bhn": "tab:red", "gn": "tab:green", "ghn": "tab:orange", "sn": "tab:purple",
               "bhn_norelay": "tab:brown"}
LINE_STYLES = ("-", ":", "-.", (0, (5, 1)))


def _batch_axis_keys(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The keys a line of error against batch size runs along: the batch, and the lr too where it follows the
    batch (the linear scaling rule: one lr per batch and line); runs of several lrs at one batch stay apart."""
    along = ("train.batch_size", "optim.lr")
    lrs: dict[tuple, set] = {}
    for row in rows:
        config = row.get("config", {})
        lrs.setdefault((row["norm"], row["batch"], setting_key(config, along)), set()).add(config.get("optim.lr"))
    return along if all(len(values) == 1 for values in lrs.values()) else along[:1]


def _color(norm: str) -> str:
    return NORM_COLORS.get(norm, "tab:gray")


def _lines(rows: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(norm, label, runs) per line: one per norm and setting (config without ``drop``), base norm first."""
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((row["norm"], setting_key(row.get("config", {}), drop)), []).append(row)
    differing = [k for k in varying_keys(r.get("config", {}) for r in rows) if k not in drop and k != "model.norm"]
    out = []
    for (norm, _), runs in sorted(lines.items(), key=lambda item: (norm_order(item[0][0]), item[0])):
        config = runs[0].get("config", {})
        label = norm_label(norm) + "".join(f", {k}={config.get(k)}" for k in differing)
        out.append((norm, label, runs))
    return out


def _finish(fig: Figure, ax, path: str | Path, **labels: str) -> Figure:
    ax.set(**labels)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return fig


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    length = min(len(r["metrics"]) for r in runs)
    epochs = np.array([runs[0]["metrics"][i]["epoch"] for i in range(length)])
    values = np.array([[r["metrics"][i][key] for i in range(length)] for r in runs])
    return epochs, values.mean(axis=0)


def plot_curves(rows: list[dict[str, Any]], path: str | Path, model: str, batch: int) -> Figure:
    """Figure 2: top-1 train and test accuracy per epoch for each norm (mean over seeds) on one chart."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    selected = [r for r in rows if r["model"] == model and r["batch"] == batch and r["metrics"]]
    if not selected:
        raise ValueError(f"no finished runs with metrics for model {model!r} at batch {batch}")
    for norm, label, runs in _lines(selected):
        for key, style, split in (("train_top1_err", "--", "train"), ("test_top1_err", "-", "test")):
            epochs, err = _mean_curve(runs, key)
            ax.plot(epochs, 100.0 - err, style, color=_color(norm), label=f"{label} {split} (n={len(runs)})")
    return _finish(fig, ax, path, xlabel="epoch", ylabel="top-1 accuracy (%)",
                   title=f"{model} on {selected[0]['dataset']}, batch {batch}: mean over seeds")


def plot_batch_size(rows: list[dict[str, Any]], path: str | Path, model: str, metric: str = "final_top1") -> Figure:
    """Figure 3: test top-1 error against mini-batch size per norm: mean line, min-max envelope over seeds."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    selected = [r for r in rows if r["model"] == model]
    if not selected:
        raise ValueError(f"no finished runs for model {model!r}")
    per_norm: dict[str, int] = {}
    for norm, label, runs in _lines(selected, drop=_batch_axis_keys(selected)):
        style = LINE_STYLES[per_norm.setdefault(norm, 0) % len(LINE_STYLES)]
        per_norm[norm] += 1
        batches = sorted({r["batch"] for r in runs})
        values = [[r[metric] for r in runs if r["batch"] == b] for b in batches]
        mean = np.array([np.mean(v) for v in values])
        ax.plot(batches, mean, marker="o", linestyle=style, color=_color(norm), label=label)
        ax.fill_between(batches, [min(v) for v in values], [max(v) for v in values], color=_color(norm), alpha=0.2)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["batch"] for r in selected})
    ax.set_xticks(ticks, labels=[str(b) for b in ticks])
    ax.minorticks_off()
    return _finish(fig, ax, path, xlabel="mini-batch size per process", ylabel="test top-1 error (%)",
                   title=f"{model} on {selected[0]['dataset']}: error vs batch size (min-max over seeds)")
