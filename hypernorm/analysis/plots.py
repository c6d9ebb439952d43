"""The paper's analysis figures from run folders: training curves (Figure 2), error vs batch size (Figure 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: works headless, whatever the backend

__all__ = ["plot_curves", "plot_batch_size"]

NORM_COLORS = {"bn": "tab:blue", "bhn": "tab:red", "gn": "tab:green", "ghn": "tab:orange", "sn": "tab:purple",
               "bhn_norelay": "tab:brown"}


def _color(norm: str) -> str:
    return NORM_COLORS.get(norm, "tab:gray")


def _norms(rows: list[dict[str, Any]]) -> list[str]:
    """The norms present, each base norm before its HyperNorm form and that before its no-relay ablation."""
    return sorted({r["norm"] for r in rows}, key=lambda n: (n.split("_")[0].endswith("hn"), "_" in n, n))


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
    for norm in _norms(selected):
        runs = [r for r in selected if r["norm"] == norm]
        for key, style, label in (("train_top1_err", "--", "train"), ("test_top1_err", "-", "test")):
            epochs, err = _mean_curve(runs, key)
            ax.plot(epochs, 100.0 - err, style, color=_color(norm), label=f"{norm.upper()} {label} (n={len(runs)})")
    return _finish(fig, ax, path, xlabel="epoch", ylabel="top-1 accuracy (%)",
                   title=f"{model} on {selected[0]['dataset']}, batch {batch}: mean over seeds")


def plot_batch_size(rows: list[dict[str, Any]], path: str | Path, model: str, metric: str = "final_top1") -> Figure:
    """Figure 3: test top-1 error against mini-batch size per norm: mean line, min-max envelope over seeds."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    selected = [r for r in rows if r["model"] == model]
    if not selected:
        raise ValueError(f"no finished runs for model {model!r}")
    for norm in _norms(selected):
        batches = sorted({r["batch"] for r in selected if r["norm"] == norm})
        values = [[r[metric] for r in selected if r["norm"] == norm and r["batch"] == b] for b in batches]
        mean = np.array([np.mean(v) for v in values])
        ax.plot(batches, mean, "o-", color=_color(norm), label=norm.upper())
        ax.fill_between(batches, [min(v) for v in values], [max(v) for v in values], color=_color(norm), alpha=0.2)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["batch"] for r in selected})
    ax.set_xticks(ticks, labels=[str(b) for b in ticks])
    ax.minorticks_off()
    return _finish(fig, ax, path, xlabel="mini-batch size per process", ylabel="test top-1 error (%)",
                   title=f"{model} on {selected[0]['dataset']}: error vs batch size (min-max over seeds)")
