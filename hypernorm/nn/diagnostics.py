"""Relay diagnostics: what the meta LSTM hands each block, and BN's affine at the same places for comparison.

:func:`track_relay` makes every HyperNorm keep running sums of its (h, c) per channel (four float64 vectors,
added under no_grad); :func:`relay_rows` turns them into one row per layer and resets them. For a model without
HyperNorm, :func:`affine_rows` reads gamma and beta of the norms :func:`hypernorm.convert` would replace.

Every statistic is a population one (divided by the count) over the samples seen since the last reset:

* ``h_mean``: the mean of h over samples and channels; ``h_std``: its spread over samples and channels.
* ``h_sample_std``: the std over samples of each channel's h, averaged over channels: how sample-specific
  the affine is (0 for BN's gamma).
* ``h_channel_std``: the std over channels of each channel's mean h: how channel-specific it is.

``h_std ** 2 == mean_k(sample var_k) + h_channel_std ** 2``; the same columns for c (BN: beta).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .convert import explain
from .hypernorm import HyperNorm

__all__ = ["RelayStats", "track_relay", "relay_rows", "affine_positions", "affine_rows", "RelayRecorder",
           "RELAY_FIELDS", "write_relay_csv", "read_relay_csv"]

STAT_FIELDS = [f"{var}_{stat}" for var in ("h", "c") for stat in ("mean", "std", "sample_std", "channel_std")]
# source: "hn" (the layer's h and c) or "affine" (a norm's gamma as h, beta as c)
RELAY_FIELDS = ["epoch", "phase", "source", "stage", "block", "layer", "samples"] + STAT_FIELDS


class RelayStats:
    """Per-channel sums of h, h^2, c, c^2 (float64) and the sample count since the last reset.

    Both are tensors updated in place, so that :meth:`add` traces into a compiled graph: a graph break at each
    layer split a compiled ResNet into a graph per block, recompiled past dynamo's limit (docs/performance.md)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.samples: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, h: torch.Tensor, c: torch.Tensor) -> None:
        h, c = h.detach().double(), c.detach().double()
        batch = torch.stack([h.sum(0), h.square().sum(0), c.sum(0), c.square().sum(0)])
        if self.sums is None:
            self.sums, self.samples = batch, batch.new_full((), h.shape[0])
        else:
            self.sums.add_(batch)
            self.samples.add_(h.shape[0])

    def reset(self) -> None:
        """Start the sums afresh, in place."""
        if self.sums is not None:
            self.sums.zero_()
            self.samples.zero_()

    @property
    def count(self) -> int:
        return 0 if self.samples is None else int(self.samples)

    def summary(self) -> dict[str, float]:
        """The :data:`STAT_FIELDS` of the samples seen so far."""
        if self.sums is None:
            raise ValueError("RelayStats.summary(): no sample was recorded since the last reset")
        moments = self.sums.cpu() / self.count  # rows: E[h], E[h^2], E[c], E[c^2] per channel
        out: dict[str, float] = {}
        for name, mean, square in (("h", moments[0], moments[1]), ("c", moments[2], moments[3])):
            out.update(_spread(name, mean, (square - mean.square()).clamp_min(0), square.mean()))
        return out


def _spread(name: str, channel_mean: torch.Tensor, channel_var: torch.Tensor,
            mean_square: torch.Tensor) -> dict[str, float]:
    mean = channel_mean.mean()
    return {f"{name}_mean": mean.item(),
            f"{name}_std": (mean_square - mean.square()).clamp_min(0).sqrt().item(),
            f"{name}_sample_std": channel_var.sqrt().mean().item(),
            f"{name}_channel_std": channel_mean.std(correction=0).item()}


def track_relay(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch the (h, c) sums of every HyperNorm of ``model`` on (fresh, zero) or off; returns ``model``."""
    for module in model.modules():
        if isinstance(module, HyperNorm):
            module.relay_stats = RelayStats() if on else None
    return model


def _stage_block(layers: list[tuple[str, HyperNorm]]) -> list[tuple[int, int, str, HyperNorm]]:
    """(stage, block, name, layer): stages numbered by their LSTM in module order, blocks within a stage."""
    stages: dict[int, int] = {}
    blocks: dict[int, int] = {}
    out = []
    for name, layer in layers:
        key = id(layer.relay)
        stage = stages.setdefault(key, len(stages))
        blocks[key] = blocks.get(key, -1) + 1
        out.append((stage, blocks[key], name, layer))
    return out


def relay_rows(model: nn.Module, reset: bool = True, **columns: Any) -> list[dict[str, Any]]:
    """One row per tracked HyperNorm that saw samples (``columns``, e.g. epoch=3, come first); ``reset``
    starts the sums afresh."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, HyperNorm)]
    rows = []
    for stage, block, name, layer in _stage_block(layers):
        stats = layer.relay_stats
        if stats is None or stats.count == 0:
            continue
        rows.append({**columns, "source": "hn", "stage": stage, "block": block, "layer": name,
                     "samples": stats.count, **stats.summary()})
        if reset:
            stats.reset()
    return rows


def affine_positions(model: nn.Module, **convert_options: Any) -> list[tuple[int, int, str]]:
    """(stage, block, qualified name) of the norms ``convert(model, "hn", **convert_options)`` would replace
    (its plan, :func:`hypernorm.nn.explain`), numbered as :func:`relay_rows` numbers the HyperNorms."""
    plan = explain(model, "hn", **convert_options)
    return [(stage, block, name) for stage, plan_stage in enumerate(plan.stages)
            for block, name in enumerate(plan_stage.norms)]


@torch.no_grad()
def affine_rows(model: nn.Module, positions: list[tuple[int, int, str]], **columns: Any) -> list[dict[str, Any]]:
    """Gamma (as h) and beta (as c) of the norms at ``positions``: mean and std over channels."""
    rows = []
    for stage, block, name in positions:
        norm = model.get_submodule(name)
        if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
            raise ValueError(f"affine_rows(): {name} ({type(norm).__name__}) has no affine weight and bias")
        row = {**columns, "source": "affine", "stage": stage, "block": block, "layer": name, "samples": ""}
        for var, param in (("h", norm.weight), ("c", norm.bias)):
            value = param.detach().double().cpu()
            row.update(_spread(var, value, torch.zeros_like(value), value.square().mean()))
        rows.append(row)
    return rows


class RelayRecorder:
    """What a training loop needs: for a HyperNorm model, tracking switched on and the rows of the samples
    seen since the last read; for any other model, gamma and beta at the places HyperNorm would take (read
    once per epoch, with phase "train": they do not depend on the phase)."""

    def __init__(self, model: nn.Module, convert_options: dict[str, Any] | None = None) -> None:
        self.model = model
        self.hypernorm = any(isinstance(m, HyperNorm) for m in model.modules())
        self.positions: list[tuple[int, int, str]] = []
        self.records_train = True  # False once the training passes replay CUDA graphs (test_only)
        if self.hypernorm:
            track_relay(model)
        else:
            try:
                positions = affine_positions(model, **(convert_options or {}))
            except (ValueError, TypeError):  # no stage HyperNorm could take: nothing to record
                positions = []
            self.positions = [(stage, block, name) for stage, block, name in positions
                              if getattr(model.get_submodule(name), "weight", None) is not None
                              and getattr(model.get_submodule(name), "bias", None) is not None]

    def test_only(self) -> None:
        """Record the test phase alone (e.g. the training steps replay CUDA graphs, where no Python runs)."""
        self.records_train = False
        track_relay(self.model)

    def read(self, epoch: int, phase: str) -> list[dict[str, Any]]:
        if phase == "train" and not self.records_train:
            raise ValueError(f"RelayRecorder.read(): the {phase} phase is not recorded")
        if self.hypernorm:
            return relay_rows(self.model, epoch=epoch, phase=phase)
        return affine_rows(self.model, self.positions, epoch=epoch, phase=phase) if phase == "train" else []


def write_relay_csv(path: str | Path, rows: list[dict[str, Any]],
                    write: Callable[[Path, str], None] | None = None) -> None:
    """Add ``rows`` (one epoch) to the CSV at ``path``, replacing any rows of that epoch or later (a resumed
    run repeats the epoch it was interrupted in). ``write(path, text)`` writes the file (default: plainly)."""
    path = Path(path)
    if not rows:
        return
    first = min(int(row["epoch"]) for row in rows)
    kept = [row for row in read_relay_csv(path, numeric=False) if int(row["epoch"]) < first] if path.is_file() else []
    out = io.StringIO()
    writer = csv.DictWriter(out, RELAY_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(kept + rows)
    (write or (lambda p, text: p.write_text(text)))(path, out.getvalue())


def read_relay_csv(path: str | Path, numeric: bool = True) -> list[dict[str, Any]]:
    """The rows of a relay CSV; ``numeric``: statistics as floats, epoch/stage/block as ints."""
    with Path(path).open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = [key for key in RELAY_FIELDS if key not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{str(path)!r} is not a relay diagnostics file: no column {', '.join(missing)}")
    if numeric:
        for line, row in enumerate(rows, start=2):
            try:
                row.update({key: int(row[key]) for key in ("epoch", "stage", "block")})
                row.update({key: float(row[key]) for key in STAT_FIELDS})
            except (TypeError, ValueError):
                raise ValueError(f"{str(path)!r} line {line}: expected numbers in epoch, stage, block and the "
                                 f"statistics") from None
    return rows
