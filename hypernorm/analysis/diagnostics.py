"""Figures of the relay diagnostics (``relay.csv`` in a run folder, see :mod:`hypernorm.nn.diagnostics`).

Per figure one column per norm (BN, BHN, BHN without relay, ...), averaged over the runs (seeds) given:

1. the scale per block: HN's h (mean over samples and channels), BN's gamma (mean over channels); one line per
   epoch, coloured by epoch; the last epoch with a band of +- its std;
2. the shift per block: HN's c, BN's beta, the same way;
3. how sample-specific the scale is per block (its std over samples, averaged over channels), one line per
   epoch (test set when every epoch was evaluated): does the LSTM learn to tell samples apart, and when;
4. at the last epoch (test set when it was evaluated): how much the scale varies between samples (std over
   samples, averaged over channels) against how much it varies between channels. BN's gamma is the same for
   every sample, so its first bar is zero.
"""
from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..nn.diagnostics import read_relay_csv
from .aggregate import collect_runs, norm_label, norm_order, setting_key, varying_keys

__all__ = ["find_relay_runs", "plot_relay", "write_relay_figures", "relay_summary"]

RELAY_FILE = "relay.csv"
LABELS = {"hn": ("h (HyperNorm scale)", "c (HyperNorm shift)"), "affine": ("γ (BN weight)", "β (BN bias)")}


def find_relay_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every finished run at or below ``root`` (the runs of the report's table) with a relay.csv: its
    name, folder, model, norm, batch, comparable config and relay rows. An unfinished run's relay.csv is
    half a run, never a result; its folder is listed under the table instead."""
    runs = []
    for row in collect_runs(root).rows:
        path = Path(row["folder"]) / RELAY_FILE
        rows = read_relay_csv(path) if path.is_file() else []
        if rows:
            runs.append({"run": Path(row["folder"]).name, "rows": rows,
                         **{key: row[key] for key in ("folder", "dataset", "model", "norm", "batch", "config")}})
    return runs


def _mean_rows(runs: list[list[dict[str, Any]]]) -> dict[tuple, dict[str, float]]:
    """(phase, epoch, stage, block) -> each statistic averaged over the runs that have it."""
    collected: dict[tuple, list[dict]] = defaultdict(list)
    for rows in runs:
        for row in rows:
            collected[(row["phase"], row["epoch"], row["stage"], row["block"])].append(row)
    return {key: {stat: float(np.mean([r[stat] for r in members])) for stat in members[0]
                  if stat.startswith(("h_", "c_"))} | {"source": members[0]["source"], "n": len(members)}
            for key, members in collected.items()}


def plot_relay(groups: dict[str, list[list[dict[str, Any]]]], path: str | Path, title: str) -> Figure:
    """The figure described in the module docstring; ``groups`` maps a column label (the norm) to the rows of
    each of its runs."""
    if not groups or not all(groups.values()):
        raise ValueError("plot_relay() needs at least one run with relay rows per column")
    columns = list(groups)
    fig = Figure(figsize=(4.2 * len(columns) + 1.2, 12.0), layout="constrained")
    axes = fig.subplots(4, len(columns), squeeze=False, sharey="row")
    last_epoch = max(row["epoch"] for runs in groups.values() for rows in runs for row in rows)
    norm = Normalize(vmin=1, vmax=max(last_epoch, 2))
    cmap = colormaps["viridis"]
    for col, label in enumerate(columns):
        means = _mean_rows(groups[label])
        positions = sorted({(stage, block) for _, _, stage, block in means})
        x = np.arange(len(positions))
        source = next(iter(means.values()))["source"]
        # the training samples; the test set's where training rows miss epochs that have test rows (the
        # train.cuda_graphs epochs record the test phase alone)
        seen = {p: {key[1] for key in means if key[0] == p} for p in ("train", "test")}
        phase = "train" if seen["train"] and seen["train"] >= seen["test"] else "test"
        epochs = sorted({epoch for p, epoch, _, _ in means if p == phase})
        for row_index, var in enumerate(("h", "c")):
            ax = axes[row_index, col]
            for epoch in epochs:
                values = [means.get((phase, epoch, *pos), {}).get(f"{var}_mean", np.nan) for pos in positions]
                ax.plot(x, values, "o-", ms=3, lw=1.2, color=cmap(norm(epoch)))
            final = [means.get((phase, epochs[-1], *pos), {}) for pos in positions]
            mean = np.array([f.get(f"{var}_mean", np.nan) for f in final])
            std = np.array([f.get(f"{var}_std", np.nan) for f in final])
            over = "samples and channels" if source == "hn" else "channels"
            ax.fill_between(x, mean - std, mean + std, color=cmap(norm(epochs[-1])), alpha=0.25,
                            label=f"± std over {over}, epoch {epochs[-1]}" + (" (test)" if phase == "test" else ""))
            ax.set_ylabel(LABELS[source][row_index] if source in LABELS else var)
            _block_axis(ax, positions)
            ax.legend(loc="best", fontsize=8)
        runs_n = len(groups[label])
        axes[0, col].set_title(f"{norm_label(label)} ({runs_n} run{'s' if runs_n > 1 else ''})")
        _sample_spread_panel(axes[2, col], means, positions, epochs, phase, source, lambda e: cmap(norm(e)))
        _spread_panel(axes[3, col], means, positions, source)
    heights = [patch.get_height() for ax in axes[3] for patch in ax.patches if np.isfinite(patch.get_height())]
    axes[3, 0].set_ylim(0, 1.4 * max(heights + [1e-6]))  # room for the legend above the bars (shared by the row)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[:3, :].ravel().tolist(), label="epoch",
                       shrink=0.8)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return fig


def _sample_spread_panel(ax, means: dict[tuple, dict], positions: list[tuple[int, int]], epochs: list[int],
                         phase: str, source: str, color) -> None:
    """How sample-specific the scale is per block, one line per epoch: the test set's rows where every epoch
    has them (fixed weights, held-out samples), else those of ``phase``."""
    if set(epochs) <= {key[1] for key in means if key[0] == "test"}:
        phase = "test"
    x = np.arange(len(positions))
    for epoch in epochs:
        ax.plot(x, [means.get((phase, epoch, *pos), {}).get("h_sample_std", np.nan) for pos in positions], "o-",
                ms=3, lw=1.2, color=color(epoch))
    ax.set_ylabel(f"std of {'h' if source == 'hn' else 'γ'} over samples ({phase})")
    _block_axis(ax, positions)


def _last_epoch(means: dict[tuple, dict]) -> tuple[str, int]:
    """Where the end-of-training numbers come from: the last epoch of the test phase where it was recorded."""
    phase = "test" if any(key[0] == "test" for key in means) else "train"
    return phase, max(key[1] for key in means if key[0] == phase)


def _spread_panel(ax, means: dict[tuple, dict], positions: list[tuple[int, int]], source: str) -> None:
    phase, last = _last_epoch(means)
    final = [means.get((phase, last, *pos), {}) for pos in positions]
    x = np.arange(len(positions))
    name = "h" if source == "hn" else "γ"
    over_samples = "(mean over channels)" if source == "hn" else "= 0: one γ for every sample"
    ax.bar(x - 0.2, [f.get("h_sample_std", np.nan) for f in final], 0.4, color="tab:red",
           label=f"std of {name} over samples {over_samples}")
    ax.bar(x + 0.2, [f.get("h_channel_std", np.nan) for f in final], 0.4, color="tab:gray",
           label=f"std of {name} over channels (of per-channel means)")
    ax.set_ylabel(f"spread of {name}, epoch {last} ({phase})")
    _block_axis(ax, positions)
    ax.legend(loc="upper left", fontsize=8)


def _block_axis(ax, positions: list[tuple[int, int]]) -> None:
    """Blocks in network order, labelled stage.block (from 1), stages separated by dotted lines."""
    ax.set_xticks(range(len(positions)), [f"{stage + 1}.{block + 1}" for stage, block in positions], fontsize=8)
    for i in range(1, len(positions)):
        if positions[i][0] != positions[i - 1][0]:
            ax.axvline(i - 0.5, color="black", lw=0.6, ls=":")
    ax.set_xlabel("block (stage.block)")
    ax.grid(alpha=0.3)


def write_relay_figures(root: str | Path, out_dir: str | Path) -> list[Path]:
    """``relay_<run>.png`` per finished run with a relay.csv below ``root``; per setting (runs equal in all but
    the seed and the norm) with at least two runs, ``relay_<model>_bs<batch>.png`` with a column per norm (mean
    over its seeds) and ``relay_summary.md``/``.csv`` (:func:`relay_summary`). Returns the paths written."""
    runs = find_relay_runs(root)
    out_dir = Path(out_dir)
    if not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        path = out_dir / f"relay_{run['run']}.png"
        plot_relay({run["norm"]: [run["rows"]]}, path, f"relay diagnostics: {run['run']} ({run['model']})")
        written.append(path)
    settings: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        settings[(run["dataset"], run["model"], run["batch"], setting_key(run["config"], drop=("model.norm",)))
                 ].append(run)
    summaries = []
    for (dataset, model, batch, setting), members in settings.items():
        if len(members) < 2:
            continue
        groups = {norm: [r["rows"] for r in members if r["norm"] == norm]
                  for norm in sorted({r["norm"] for r in members}, key=lambda n: (norm_order(n), n))}
        # another setting of the same model and batch (another schedule, say): its own figure, its keys in the title
        siblings = [dict(key[3]) for key in settings if key[:3] == (dataset, model, batch)]
        values = {k: json.loads(dict(setting).get(k, "null")) for k in varying_keys(siblings)}
        stem = f"relay_{model}_bs{batch}"
        if len(siblings) > 1:
            stem += re.sub(r"[^\w.=-]+", "-", "".join(f"_{k.split('.')[-1]}={v}" for k, v in values.items()))
        label = "".join(f", {k}={v}" for k, v in values.items())
        plot_relay(groups, out_dir / f"{stem}.png",
                   f"relay diagnostics: {model}, batch {batch}{label}, mean over runs")
        written.append(out_dir / f"{stem}.png")
        summaries += [{"figure": f"{stem}.png", "dataset": dataset, "model": model, "batch": batch, **entry}
                      for entry in relay_summary(groups)]
    if summaries:
        written += _write_summary(summaries, out_dir)
    return written


# h varies this little between samples (std over samples, mean over channels) where a block gives every sample
# practically the same scale
SAME_FOR_EVERY_SAMPLE = 1e-3


def relay_summary(groups: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per norm, the last epoch's rows (test phase where recorded) averaged over layers and runs: mean, spread
    over samples and spread over channels of h and c, and how many blocks give every sample the same h."""
    out = []
    for norm, runs in groups.items():
        means = _mean_rows(runs)
        phase, last = _last_epoch(means)
        final = [value for key, value in means.items() if key[0] == phase and key[1] == last]
        entry: dict[str, Any] = {"norm": norm, "runs": len(runs), "epoch": last, "phase": phase,
                                 "source": final[0]["source"], "layers": len(final)}
        for stat in ("h_mean", "h_sample_std", "h_channel_std", "c_mean", "c_sample_std", "c_channel_std"):
            entry[stat] = float(np.mean([row[stat] for row in final]))
        entry["blocks_same_h"] = sum(row["h_sample_std"] < SAME_FOR_EVERY_SAMPLE for row in final)
        out.append(entry)
    return out


def _write_summary(summaries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    csv_path, md_path = out_dir / "relay_summary.csv", out_dir / "relay_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    lines = ["| figure | norm | runs | epoch (phase) | h mean | h std over samples | h std over channels | c std over "
             f"samples | c std over channels | blocks with h std over samples < {SAME_FOR_EVERY_SAMPLE:g} |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for e in summaries:
        lines.append(f"| {e['figure']} | {norm_label(e['norm'])} | {e['runs']} | {e['epoch']} ({e['phase']}) "
                     f"| {e['h_mean']:.4f} | {e['h_sample_std']:.4f} | {e['h_channel_std']:.4f} "
                     f"| {e['c_sample_std']:.4f} | {e['c_channel_std']:.4f} | {e['blocks_same_h']} of {e['layers']} |")
    md_path.write_text("Relay diagnostics at the last epoch, mean over layers (blocks) and runs (seeds); BN rows: "
                       "γ and β, the same for every sample.\n\n" + "\n".join(lines) + "\n")
    return [csv_path, md_path]
