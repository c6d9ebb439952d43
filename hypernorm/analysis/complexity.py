"""Parameters and FLOPs in the paper's convention, and the ``hypernorm complexity`` command (Table 3).

The paper's FLOPs are multiply-adds (MACs) of the convolution and linear layers: ResNet-50 is 4.089G at
224x224. They are counted here with ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
products and convolutions (mm, addmm, bmm, convolution) as 2 FLOPs per multiply-add, so MACs = its FLOPs / 2.
HyperNorm's meta LSTM is made of linear layers and is counted; norms, activations, pooling, element-wise
ops and biases are not.
"""
from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass, field
from typing import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
# torch and the model zoo are imported inside the functions: the ``hypernorm`` command builds this module's
# parser without loading torch.

__all__ = ["Complexity", "complexity", "affine_norm_channels", "format_count", "measure", "TABLE3", "table3_report",
           "add_parser"]

CONVENTION = (
    "FLOPs = multiply-adds of convolution and linear layers (the paper's convention; HyperNorm's meta LSTM "
    "is made of linear layers and counts), counted with torch.utils.flop_counter.FlopCounterMode "
    "(FLOPs/2). Norms, activations, pooling, element-wise ops and biases are not counted. "
    "One image per forward pass; M=1e6, G=1e9."
)


@dataclass(frozen=True)
class Complexity:
    """``params``: parameter count. ``flops``: multiply-adds per sample (the paper's FLOPs)."""

    params: int
    flops: int
    input_size: tuple[int, ...]
    by_operator: dict[str, int] = field(default_factory=dict)  # multiply-adds per aten operator

    def __str__(self) -> str:
        return f"{format_count(self.params, 'M')} params, {format_count(self.flops)} FLOPs at {self.input_size}"


def _input_shape(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (input_size,) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 1:
        size = (3, size[0], size[0])
    elif len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be S, (H, W) or (C, H, W) with positive sizes, got {input_size!r}")
    return size  # type: ignore[return-value]


def complexity(model: nn.Module, input_size: int | Sequence[int] = 224) -> Complexity:
    """Parameters and multiply-adds of one forward pass of a single ``input_size`` image (S, (H, W) or
    (C, H, W)), in eval mode. The input lives on the model's device: a model built under
    ``torch.device("meta")`` is counted from shapes alone, without computing anything.

    HyperNorm layers are counted on their reference path, the arithmetic of the paper's equations: the fast
    path multiplies a block-diagonal weight whose zero blocks would otherwise add to the count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..nn import HyperNorm

    shape = _input_shape(input_size)
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), torch.empty(0))
    x = torch.zeros(1, *shape, dtype=tensor.dtype if tensor.is_floating_point() else torch.float32,
                    device=tensor.device)
    modes = {module: module.training for module in model.modules()}
    fused = {m: m.fused for m in model.modules() if isinstance(m, HyperNorm)}
    model.eval()  # no running-statistics update; the count is the same in train mode
    try:
        for layer in fused:
            layer.fused = False
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    finally:
        for module, training in modes.items():
            module.training = training
        for layer, was_fused in fused.items():
            layer.fused = was_fused
    by_operator = {str(op): int(count) // 2 for op, count in counter.get_flop_counts()["Global"].items()}
    return Complexity(
        params=sum(p.numel() for p in model.parameters()),
        flops=int(counter.get_total_flops()) // 2,
        input_size=(1, *shape),
        by_operator=by_operator,
    )


def affine_norm_channels(model: nn.Module) -> int:
    """Channels of the norm layers that carry a learned affine (HyperNorm's standardizers carry none)."""
    from ..nn import HyperNorm, is_norm

    return sum(m.weight.numel() for m in model.modules()
               if is_norm(m) and not isinstance(m, HyperNorm) and getattr(m, "weight", None) is not None)


_UNITS = {"M": 1e6, "G": 1e9}


def format_count(value: float, unit: str | None = None, digits: int = 3) -> str:
    """1_814_073_344 -> "1.814G", as the paper prints its figures (unit G from 1e9 on unless given)."""
    unit = unit or ("G" if value >= 1e9 else "M")
    return f"{value / _UNITS[unit]:.{digits}f}{unit}"


def _parse_count(text: str) -> tuple[float, str, int]:
    """"1.814G" -> (1.814e9, "G", 3)."""
    number, unit = text[:-1], text[-1]
    return float(number) * _UNITS[unit], unit, len(number.partition(".")[2])


def _same_as_paper(value: float, paper: str) -> bool:
    _, unit, digits = _parse_count(paper)
    return format_count(value, unit, digits) == paper


def _truncated(value: float, paper: str) -> str:
    _, unit, digits = _parse_count(paper)
    scaled = math.floor(value / _UNITS[unit] * 10 ** digits) / 10 ** digits
    return f"{scaled:.{digits}f}{unit}"


# Table 3 of the paper: network -> (label, {norm: (params, FLOPs)}), copied as printed.
TABLE3: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "resnet18": ("ResNet-18", {"bn": ("11.690M", "1.814G"), "bhn": ("12.564M", "1.816G")}),
    "resnet50": ("ResNet-50", {"bn": ("25.557M", "4.089G"), "bhn": ("26.428M", "4.092G")}),
    "resnet101": ("ResNet-101", {"bn": ("44.549M", "7.801G"), "bhn": ("45.411M", "7.807G")}),
    "shufflenet_v2_x1_0": ("ShuffleNetV2 1x", {"bn": ("2.278M", "144.916M"), "bhn": ("2.455M", "145.578M")}),
    "seresnet50": ("SE-ResNet-50", {"bn": ("28.088M", "4.091G"), "bhn": ("28.959M", "4.095G")}),
}


@dataclass
class Row:
    network: str
    label: str
    norm: str
    result: Complexity
    affine_channels: int
    paper: tuple[str, str] | None = None

    @property
    def matches(self) -> tuple[bool, bool] | None:
        if self.paper is None:
            return None
        return _same_as_paper(self.result.params, self.paper[0]), _same_as_paper(self.result.flops, self.paper[1])


def _build(name: str, norm: str, num_classes: int | None) -> nn.Module:
    import torch

    from ..models import create_model

    with torch.device("meta"):  # shapes only: no memory for weights, no arithmetic
        return create_model(name, norm, num_classes=num_classes)


def measure(models: Sequence[str], norms: Sequence[str], input_size: int | None = None,
            num_classes: int | None = None) -> list[Row]:
    from ..models import model_info

    rows = []
    for name in models:
        info = model_info(name)
        label, paper = TABLE3.get(name, (name, {}))
        for norm in norms:
            model = _build(name, norm, num_classes)
            size = info.input_size if input_size is None else input_size
            known = paper.get(norm) if size == 224 and num_classes in (None, 1000) else None
            rows.append(Row(name, label, norm, complexity(model, size), affine_norm_channels(model), known))
    return rows


def _explain(row: Row, rows: list[Row]) -> list[str]:
    """Why a figure differs from the paper's, worked out from the models themselves."""
    notes: list[str] = []
    params_ok, flops_ok = row.matches or (True, True)
    what = f"{row.label} {row.norm.upper()}"
    if not params_ok:
        ours, paper = row.result.params, row.paper[0]
        reason = f"{ours:,} truncated instead of rounded is {paper}" if _truncated(ours, paper) == paper \
            else "no explanation found"
        notes.append(f"{what} params {format_count(ours, 'M')} vs paper {paper}: {reason}.")
    if flops_ok:
        return notes
    paper_flops = row.paper[1]
    ours = format_count(row.result.flops, _parse_count(paper_flops)[1])
    why = []
    with_norms = row.result.flops + row.affine_channels
    if _same_as_paper(with_norms, paper_flops):
        why.append(
            f"ours plus one operation per channel of every norm layer with an affine "
            f"({row.affine_channels:,} channels here; HyperNorm's standardizers have none) is "
            f"{format_count(with_norms, _parse_count(paper_flops)[1])}, the paper's figure: its counter "
            "presumably also charged each norm's per-channel affine once"
        )
    if _truncated(row.result.flops, paper_flops) == paper_flops:
        why.append(f"{format_count(row.result.flops, digits=4)} truncated instead of rounded is {paper_flops}")
    if row.norm == "bn":
        hyper = next((r for r in rows if r.network == row.network and r.norm == "bhn" and r.paper), None)
        if hyper is not None and hyper.matches and hyper.matches[1]:
            lstm = hyper.result.flops - row.result.flops
            value, unit, digits = _parse_count(hyper.paper[1])
            half = 0.5 * _UNITS[unit] / 10 ** digits
            lo, hi = value - half - lstm, value + half - lstm
            inside = lo <= row.result.flops < hi
            why.append(
                f"the paper's own BHN figure {hyper.paper[1]} minus the meta LSTMs' {format_count(lstm, 'M')} "
                f"multiply-adds puts the BN figure in [{format_count(lo, digits=4)}, {format_count(hi, digits=4)})"
                + (", which holds ours" if inside else ", which does not hold ours")
            )
    reason = "; ".join(why) if why else "no explanation found"
    notes.append(f"{what} FLOPs {ours} vs paper {paper_flops}: {reason}.")
    return notes


def table3_report(rows: list[Row]) -> str:
    """The table as text: our params/FLOPs, the paper's where known, and notes on every mismatch."""
    lines = textwrap.wrap(CONVENTION, 100) + [""]
    header = f"{'network':<20}{'norm':<9}{'input':>8}{'params':>10}{'FLOPs':>11}{'paper params':>14}" \
             f"{'paper FLOPs':>13}  match"
    lines += [header, "-" * len(header)]
    notes: list[str] = []
    for row in rows:
        size = "x".join(str(s) for s in row.result.input_size[2:])
        flops_unit = _parse_count(row.paper[1])[1] if row.paper else None
        cells = f"{row.label:<20}{row.norm.upper():<9}{size:>8}{format_count(row.result.params, 'M'):>10}" \
                f"{format_count(row.result.flops, flops_unit):>11}"
        if row.paper is None:
            lines.append(cells)
            continue
        params_ok, flops_ok = row.matches
        mark = "yes" if params_ok and flops_ok else "no (params)" if not params_ok and flops_ok else \
            "no (FLOPs)" if params_ok else "no"
        lines.append(f"{cells}{row.paper[0]:>14}{row.paper[1]:>13}  {mark}")
        notes += _explain(row, rows)
    if notes:
        lines += ["", "Figures that differ from the paper's, and why:"] + [
            textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ") for note in notes]
    matched = [row for row in rows if row.matches and row.matches[1]]
    if matched and any("per-channel affine" in note for note in notes):
        kept = all(_same_as_paper(row.result.flops + row.affine_channels, row.paper[1]) for row in matched)
        lines.append(textwrap.fill(
            f"Adding those norm channels to every row {'keeps' if kept else 'breaks'} the {len(matched)} "
            "FLOPs figures that match as they are.", 100, initial_indent="- ", subsequent_indent="  "))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from ..models import model_info
    from ..nn import norm_names

    models = args.model or list(TABLE3)
    for name in models:
        model_info(name)  # unknown names: an error listing the valid ones
    norms = args.norm or ["bn", "bhn"]
    for norm in norms:
        if norm not in norm_names():
            raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(norm_names())}")
    print(table3_report(measure(models, norms, args.input_size, args.num_classes)))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "complexity",
        help="parameters and FLOPs (multiply-adds) per model and norm; by default the paper's Table 3",
        description="Prints parameters and FLOPs in the paper's convention for each model and norm, beside "
                    "Table 3's figures where the paper has them, with the reason for every figure that differs. "
                    "Models are built on the meta device: nothing is computed, so any network is counted "
                    "in seconds.",
    )
    parser.add_argument("-m", "--model", nargs="+", metavar="NAME",
                        help="models (default: Table 3's); any name of hypernorm.list_models() (an unknown name "
                             "lists them)")
    parser.add_argument("-n", "--norm", nargs="+", metavar="NORM", help="norms (default: bn bhn)")
    parser.add_argument("-s", "--input-size", type=int, default=None,
                        help="square input resolution (default: each model's own, 224 or 32)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    parser.set_defaults(func=_run)
    return parser
