"""The table of docs/convert.md: :func:`hypernorm.convert` on today's torchvision and timm families, each
built with random weights, converted with ``norm="hn"`` and checked for batch independence in eval and for
``torch.compile(fullgraph=True)`` giving the eager output."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..engine.checkpoint import atomic_write
from ..nn import convert, explain
from .external import convert_defaults, create_external_model

__all__ = ["COMPILE_ROUNDING_FACTOR", "FAMILIES", "FamilyRow", "compile_check", "family_rows", "markdown_table",
           "write_table"]

# (model, constructor arguments, input size[, convert arguments]): small inputs keep the check fast, the ViTs
# are built for them; without convert arguments, norm="hn" and the family's defaults (convert_defaults)
FAMILIES: list[tuple] = [
    ("torchvision/resnet50", {}, 32),
    ("torchvision/resnext50_32x4d", {}, 32),
    ("torchvision/mobilenet_v2", {}, 32),
    ("torchvision/mobilenet_v3_small", {}, 32),
    ("torchvision/efficientnet_b0", {}, 32),
    ("torchvision/regnet_y_400mf", {}, 32),
    ("torchvision/convnext_tiny", {}, 32),
    ("torchvision/densenet121", {}, 32),
    ("torchvision/densenet121", {}, 32, {"norm": "hn", "norm_index": 0}),  # its first norms grow: refused
    ("torchvision/vit_b_16", {"image_size": 32}, 32),
    ("torchvision/vit_b_16", {"image_size": 32}, 32, {"norm": "bhn"}),  # BN cannot serve tokens: refused
    ("torchvision/swin_t", {}, 32),
    ("torchvision/shufflenet_v2_x1_0", {}, 32),
    ("timm/resnet50", {}, 32),
    ("timm/efficientnet_b0", {}, 32),
    ("timm/regnety_002", {}, 32),
    ("timm/convnext_atto", {}, 32),
    ("timm/vit_tiny_patch16_224", {"img_size": 32}, 32),
]

TABLE_START, TABLE_END = "<!-- convert-table: start -->", "<!-- convert-table: end -->"


@dataclass
class FamilyRow:
    model: str
    options: dict[str, Any]  # convert()'s arguments, norm included
    refused: str  # the reason, or "" when converted
    stages: list[str] = field(default_factory=list)  # their names, as the plan prints them
    hn_layers: int = 0
    skipped: int = 0
    params_before: int = 0
    params_after: int = 0
    batch_independent: bool | None = None  # a sample's eval output alone equals it within a batch of 3
    compile_matches: str = ""  # "yes", or why not (compile_check)


# Eager float32 and compiled float32 are two roundings of one function (the compiled one fuses and reorders
# sums): each lies about the float32 rounding error e off the exact (float64) output, so they differ by up to
# about 2e; a factor 8 leaves room for another order of the same sums drawing larger errors (measured: up to
# 3x e). e is at least one float32 epsilon of the output's largest value, for an eager output exact by luck.
COMPILE_ROUNDING_FACTOR = 8.0


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# layers that draw random numbers in training (dropout, stochastic depth): eager, float64 and compiled code draw
# different ones, so the train-mode check runs them as in eval
_RANDOM_IN_TRAINING = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "StochasticDepth", "DropPath",
                       "DropBlock2d")


def _set_mode(model: nn.Module, train: bool) -> nn.Module:
    model.train(train)
    for module in model.modules():
        if type(module).__name__ in _RANDOM_IN_TRAINING:
            module.eval()
    return model


def compile_check(model: nn.Module, x: torch.Tensor, backend: str = "inductor") -> str:
    """Whether ``torch.compile(model, fullgraph=True)`` gives the eager output for ``x``, in eval and in one
    train-mode forward (dropout and stochastic depth off): "yes", "NO: <mode> differs by d > bound b" or "fails: <one-line reason>" (a graph
    break or an error). The bound is COMPILE_ROUNDING_FACTOR times the eager float32 output's distance from
    the float64 one (its rounding error at this input, at least one float32 epsilon of its largest value).
    ``backend="aot_eager"`` checks the same fullgraph capture without inductor's code generation (minutes on
    a CPU). ``model`` is left in train mode."""
    def rounding_bound(train: bool) -> tuple[torch.Tensor, float]:
        exact = _set_mode(copy.deepcopy(model).double(), train)  # copies: a train forward moves running statistics
        eager = _set_mode(copy.deepcopy(model), train)
        with torch.set_grad_enabled(train):  # train: the forward of a training step, as the trainer compiles it
            expected = eager(x)
            exact_out = exact(x.double())
            floor = torch.finfo(torch.float32).eps * exact_out.abs().max().item()
            rounding = max(_max_diff(expected, exact_out), floor)
            return expected, COMPILE_ROUNDING_FACTOR * rounding

    torch._dynamo.reset()  # each family compiles from scratch, within dynamo's recompile limit
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for mode, train in (("eval", False), ("train", True)):
        expected, bound = rounding_bound(train)
        _set_mode(model, train)
        try:
            with torch.set_grad_enabled(train):
                got = compiled(x)
        except Exception as err:  # noqa: BLE001  a graph break or a compiler error: the table says which
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"fails ({mode}): {type(err).__name__}: {reason}"[:300]
        diff = _max_diff(got, expected)
        if diff > bound:
            return f"NO: {mode} differs by {diff:.1e} > bound {bound:.1e}"
    return "yes"


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def family_row(name: str, kwargs: dict[str, Any], size: int, options: dict[str, Any] | None = None,
               num_classes: int = 10, check_compile: bool = False) -> FamilyRow:
    """One row; ``check_compile`` adds compile_check (inductor: a minute or two per model on a CPU)."""
    torch.manual_seed(0)
    options = {"norm": "hn", **convert_defaults(name)} if options is None else options
    model = create_external_model(name, "bn", num_classes, **kwargs)
    before = _n_params(model)
    try:
        plan = explain(model, **options)
    except ValueError as err:
        return FamilyRow(name, options, str(err).removeprefix("convert(): "), params_before=before)
    convert(model, **options)
    model.train()
    x = torch.randn(3, 3, size, size)
    model(x).sum().backward()  # a training step runs; it also moves the running statistics
    model.eval()
    with torch.no_grad():
        independent = torch.allclose(model(x)[1:2], model(x[1:2]), rtol=1e-4, atol=1e-5)
    compiles = compile_check(model, x) if check_compile else ""
    return FamilyRow(name, options, "", [stage.name for stage in plan.stages], plan.hn_layers, len(plan.skipped), before,
                     _n_params(model), independent, compiles)


def family_rows(names: list[str] | None = None) -> list[FamilyRow]:
    rows = []
    for family in tqdm([f for f in FAMILIES if names is None or f[0] in names], desc="families"):  # minutes each
        rows.append(family_row(*family, check_compile=True))
        tqdm.write(f"{rows[-1].model}: {'refused' if rows[-1].refused else 'converted'}, compile == eager: "
                   f"{rows[-1].compile_matches or '-'}")
    return rows


def markdown_table(rows: list[FamilyRow]) -> str:
    lines = ["| model | convert arguments | result | stages found | HN layers | blocks left out | params before | params after "
             "| eval batch-independent | compile == eager |", "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        options = ", ".join(f"{k}={v!r}" for k, v in r.options.items())
        if r.refused:
            lines.append(f"| {r.model} | {options} | refused: {r.refused} | | | | {r.params_before:,} | | | |")
            continue
        check = {True: "yes", False: "NO", None: "-"}[r.batch_independent]
        lines.append(f"| {r.model} | {options} | converted | {len(r.stages)}: {', '.join(r.stages)} | {r.hn_layers} | {r.skipped} | "
                     f"{r.params_before:,} | {r.params_after:,} | {check} | {r.compile_matches or '-'} |")
    return "\n".join(lines)


def write_table(path: str | Path, rows: list[FamilyRow]) -> None:
    """Put the table between the convert-table markers of ``path``; the text around them stays."""
    path = Path(path)
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no '{TABLE_START}' ... '{TABLE_END}' markers to put the table between")
    body = f"{TABLE_START}\n{markdown_table(rows)}\n{TABLE_END}"
    text = re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: body, text, flags=re.S)
    atomic_write(path, lambda f: f.write(text.encode()))
