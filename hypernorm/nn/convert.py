"""Plug-and-play conversion: put one relayed HyperNorm in every building block of an existing model.

How stages are found (:func:`explain` shows the result before anything changes):

* A *block* is a module of its own class (not a bare ``Sequential``/``ModuleList``/``ModuleDict``) that holds
  at least one norm and at least two convolution or linear layers, and no stage of its own. A conv-norm-act
  unit (one layer and its norm), a Squeeze-Excite module or a block's inner branches are parts of a block.
* A *stage* is a maximal run of two or more consecutive sibling blocks of one class whose chosen norm
  (``norm_index``) has one width, at any depth of the module tree. The stage's blocks share one LSTM.
* A block whose chosen norm differs in width from its neighbours' (typically the first, down-sampling or
  expanding block of a stage) is left out with its norms as they were: a relay needs two blocks of one
  width. :func:`explain` lists every such block and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .factory import split_norm_name, split_relay
from .hypernorm import HyperNorm, share_relay
from .meta_lstm import TrimmedLSTMCell
from .norms import create_base_norm, is_norm, norm_width, normalizes_last_dim, standardizer_like
from .replace import copy_norm_state, replace_module

__all__ = ["convert", "explain", "find_stages", "ConversionPlan", "StagePlan"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_HINT = "Pass stages=[names of the modules holding the blocks], norm_index= (which norm of a block) or skip=."


@dataclass
class StagePlan:
    """One relay: the blocks that get a HyperNorm, in execution order."""

    container: str  # qualified name of the module whose children the blocks are ("" = the model)
    blocks: list[str]  # the blocks' names inside ``container``
    norms: list[str]  # qualified name of the norm each block gets its HyperNorm on
    kinds: list[str]  # class name of each replaced norm
    width: int
    params_added: int  # the LSTM minus the replaced norms' affine parameters
    whole: bool  # the blocks are all of the container's children

    @property
    def name(self) -> str:
        return _stage_name(self.container, self.blocks, self.whole)


@dataclass
class ConversionPlan:
    """What :func:`convert` does to a model: the stages, and every block left out with the reason."""

    model: str
    norm: str
    stages: list[StagePlan] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (block, reason)

    @property
    def hn_layers(self) -> int:
        return sum(len(stage.blocks) for stage in self.stages)

    @property
    def params_added(self) -> int:
        return sum(stage.params_added for stage in self.stages)

    def __str__(self) -> str:
        lines = [f"{self.model} -> norm={self.norm!r}: {len(self.stages)} stages, {self.hn_layers} HyperNorm "
                 f"layers, {self.params_added:+,} parameters"]
        for stage in self.stages:
            lines.append(f"  stage {stage.name}: {len(stage.blocks)} blocks, width {stage.width}, "
                         f"{stage.params_added:+,} parameters")
            for norm, kind in zip(stage.norms, stage.kinds):
                lines.append(f"    {norm} ({kind})")
        for block, reason in self.skipped:
            lines.append(f"  skipped {block}: {reason}")
        return "\n".join(lines)


def _norms_of(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's norm layers in registration order, leaving out the standardizers inside HyperNorms."""
    found, inside_hn = [], []
    for name, module in block.named_modules():
        if any(name.startswith(prefix) for prefix in inside_hn):
            continue
        if isinstance(module, HyperNorm):
            inside_hn.append(name + ".")
            found.append((name, module))
        elif is_norm(module):
            found.append((name, module))
    return found


def _layer_count(block: nn.Module) -> int:
    return sum(isinstance(m, _LAYERS) for m in block.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _discover(module: nn.Module, prefix: str, norm_index: int | str, skip: Callable[[nn.Module], bool] | None,
              stages: list[tuple[str, list[str]]], skipped: list[tuple[str, str]]) -> bool:
    """Append the stages inside ``module`` (bottom-up) to ``stages`` and the blocks left out to ``skipped``;
    True if it holds any stage. What is left out inside a block is not reported: the block is the unit."""
    # (child name, child, chosen norm width, len(stages) then), or None where a run breaks
    found_inside, candidates = False, []
    for name, child in module.named_children():
        qualified = _join(prefix, name)
        if is_norm(child) or isinstance(child, HyperNorm):
            candidates.append(None)
            continue
        inner_skipped: list[tuple[str, str]] = []
        if _discover(child, qualified, norm_index, skip, stages, inner_skipped):
            found_inside = True
            skipped.extend(inner_skipped)
            candidates.append(None)
            continue
        if type(child) in _CONTAINERS or not _norms_of(child) or _layer_count(child) < 2:
            skipped.extend(inner_skipped)
            candidates.append(None)
            continue
        if skip is not None and skip(child):
            skipped.append((qualified, "skip= returned True"))
            continue  # left out; the run goes on past it
        try:
            _, chosen = _pick_norm(child, norm_index, qualified)
            candidates.append((name, child, norm_width(chosen), len(stages)))
        except ValueError as err:
            skipped.append((qualified, str(err).removeprefix("convert(): ")))
            candidates.append(None)
    run: list[tuple[str, nn.Module, int, int]] = []
    inserted = 0  # stages are listed in the model's order: a run goes before the stages of later siblings
    for candidate in candidates + [None]:
        if run and (candidate is None or type(candidate[1]) is not type(run[0][1]) or candidate[2] != run[0][2]):
            if len(run) >= 2:
                stages.insert(run[0][3] + inserted, (prefix, [name for name, *_ in run]))
                inserted += 1
                found_inside = True
            else:
                skipped.append((_join(prefix, run[0][0]), f"its chosen norm's width {run[0][2]} is not shared by a "
                                "neighbouring block of its class; a relay needs two"))
            run = []
        if candidate is not None:
            run.append(candidate)
    return found_inside


def find_stages(model: nn.Module, norm_index: int | str = 0,
                skip: Callable[[nn.Module], bool] | None = None) -> list[str]:
    """Names of the stages :func:`convert` would relay, as in :meth:`StagePlan.name`."""
    stages: list[tuple[str, list[str]]] = []
    _discover(model, "", norm_index, skip, stages, [])
    return [_stage_name(name, blocks, _is_whole(model, name, blocks)) for name, blocks in stages]


def _stage_name(container: str, blocks: list[str], whole: bool) -> str:
    return container if whole and container else f"{container or '(model)'}[{blocks[0]}..{blocks[-1]}]"


def _is_whole(model: nn.Module, container: str, blocks: list[str]) -> bool:
    return [name for name, _ in model.get_submodule(container).named_children()] == blocks


def _check_kind(old: nn.Module, base: str | None, qualified: str, norm: str) -> None:
    """Refuse, before anything changes, a standardizer that cannot serve ``old``'s layout."""
    try:
        if base is None:
            standardizer_like(old, check_only=True)
    except TypeError as err:
        raise ValueError(f"convert(): {qualified}: {err}; use skip= or norm_index= to leave it") from None
    # every registered kind takes (N, C, H, W); only "cln" has a form for a LayerNorm over the last dim
    if base not in (None, "cln") and normalizes_last_dim(old):
        raise ValueError(f"convert(): norm={norm!r} cannot serve {qualified}, a {type(old).__name__} over the last "
                         f"dim of (N, ..., {norm_width(old)}) inputs (channels-last or tokens); use norm='hn' "
                         "(keeps it) or 'clhn'")


def _standardizer(old: nn.Module, base: str | None) -> nn.Module:
    """An affine-free norm for the new HyperNorm: a copy of ``old`` (base None), or a fresh ``base`` norm
    that takes over ``old``'s running statistics when both are batch norms."""
    if base is None:
        return standardizer_like(old)
    if normalizes_last_dim(old):
        return nn.LayerNorm(norm_width(old), eps=old.eps, elementwise_affine=False)
    new = create_base_norm(base, norm_width(old), affine=False)
    if isinstance(new, nn.modules.batchnorm._BatchNorm) and isinstance(old, nn.modules.batchnorm._BatchNorm) \
            and old.track_running_stats and new.track_running_stats:
        return copy_norm_state(old, new)
    new.train(old.training)
    return new


def _lstm_params(width: int, reduction: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in TrimmedLSTMCell(width, reduction).parameters())


def explain(
    model: nn.Module,
    norm: str = "bhn",
    *,
    stages: Sequence[str] | None = None,
    norm_index: int | str = 0,
    skip: Callable[[nn.Module], bool] | None = None,
    reduction: int = 4,
) -> ConversionPlan:
    """The plan :func:`convert` would carry out with these arguments, without changing ``model``.
    Raises ValueError where :func:`convert` would refuse; ``print()`` the plan to read it."""
    base = _base_norm(norm)
    skipped: list[tuple[str, str]] = []
    if stages is not None:
        found = [(name, _explicit_blocks(model, name, skip, skipped)) for name in stages]
    else:
        found = []
        _discover(model, "", norm_index, skip, found, skipped)
    if not found:
        raise ValueError(f"convert() found no stage in {type(model).__name__}: no run of two or more sibling blocks "
                         f"whose chosen norm (norm_index={norm_index!r}) has one width. {_HINT}")
    plan = ConversionPlan(type(model).__name__, norm, skipped=skipped)
    for container, block_names in found:
        picks = []
        for block_name in block_names:
            block = model.get_submodule(_join(container, block_name))
            norm_name, old = _pick_norm(block, norm_index, _join(container, block_name))
            qualified = _join(_join(container, block_name), norm_name)
            if isinstance(old, HyperNorm):
                raise ValueError(f"convert(): {qualified} is already a HyperNorm; the model was converted before")
            _check_kind(old, base, qualified, norm)
            picks.append((qualified, old))
        widths = {norm_width(old) for _, old in picks}
        if len(widths) != 1:
            listing = ", ".join(f"{qualified}({norm_width(old)})" for qualified, old in picks)
            raise ValueError(f"convert(): stage {container!r} shares one LSTM, so its norms need one width; got "
                             f"{listing}. Choose another norm_index, or skip= the odd blocks.")
        width = widths.pop()
        dropped = sum(p.numel() for _, old in picks for p in old.parameters(recurse=False))
        plan.stages.append(StagePlan(container, block_names, [q for q, _ in picks],
                                     [type(old).__name__ for _, old in picks], width,
                                     _lstm_params(width, reduction) - dropped,
                                     stages is not None or _is_whole(model, container, block_names)))
    return plan


def _explicit_blocks(model: nn.Module, stage_name: str, skip: Callable[[nn.Module], bool] | None,
                     skipped: list[tuple[str, str]]) -> list[str]:
    try:
        stage = model.get_submodule(stage_name)
    except AttributeError:
        raise ValueError(f"convert(): {type(model).__name__} has no stage {stage_name!r}") from None
    blocks = []
    for name, block in stage.named_children():
        if skip is not None and skip(block):
            skipped.append((_join(stage_name, name), "skip= returned True"))
        else:
            blocks.append(name)
    if not blocks:
        raise ValueError(f"convert(): every block of stage {stage_name!r} was skipped")
    return blocks


def _base_norm(norm: str) -> str | None:
    if norm == "hn":
        return None
    base, hyper = split_norm_name(norm)
    if not hyper:
        raise ValueError(f"convert() puts HyperNorm in place: norm must be 'hn' or a HyperNorm name, got {norm!r}")
    return base


def convert(
    model: nn.Module,
    norm: str = "bhn",
    *,
    stages: Sequence[str] | None = None,
    norm_index: int | str = 0,
    skip: Callable[[nn.Module], bool] | None = None,
    reduction: int = 4,
    dry_run: bool = False,
) -> nn.Module | ConversionPlan:
    """Replace one norm per building block of ``model`` with a HyperNorm sharing its stage's LSTM.

    Args:
        norm: "hn" keeps each replaced norm's own kind (BN -> BHN, GN -> GHN, a LayerNorm stays a LayerNorm;
            running statistics kept); a HyperNorm name ("bhn", "syncbhn", "ghn", "clhn", ...) sets the
            standardizer, and is refused for a norm whose layout it cannot serve. With "_norelay" ("bhn_norelay")
            every block's LSTM step starts from zero state (the no-relay ablation, same parameters).
        stages: qualified names of the stage containers (all their children are the blocks); found as the
            module docstring describes when omitted.
        norm_index: which norm of a block: its position among the block's norms (0 = first, -1 = last)
            or its name inside the block (e.g. "bn2").
        skip: blocks for which it returns True keep their norms (for example ShuffleNetV2's
            down-sampling units, whose first norm is narrower than the stage).
        reduction: bottleneck ratio of the LSTM gate maps.
        dry_run: return the :class:`ConversionPlan` (as :func:`explain` does) and change nothing.

    The replaced norms' affine parameters are dropped; an activation fused into the norm (timm's
    ``BatchNormAct2d``) follows the HyperNorm. Every other layer is untouched. The model is changed in place
    and returned.
    """
    plan = explain(model, norm, stages=stages, norm_index=norm_index, skip=skip, reduction=reduction)
    if dry_run:
        return plan
    base = _base_norm(norm)
    for stage in plan.stages:
        layers = []
        for qualified in stage.norms:
            old = model.get_submodule(qualified)
            layer = HyperNorm(norm_width(old), _standardizer(old, base), reduction, name=qualified,
                              channels_last=normalizes_last_dim(old), relayed=split_relay(norm)[1])
            # timm's norm-act layers (BatchNormAct2d): HN replaces the affine, the dropout and activation stay
            after = [m for m in (getattr(old, "drop", None), getattr(old, "act", None))
                     if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
            replacement = nn.Sequential(layer, *after) if after else layer
            replace_module(model, qualified, replacement)
            layers.append(layer)
        share_relay(layers)
    return model


def _pick_norm(block: nn.Module, norm_index: int | str, block_name: str) -> tuple[str, nn.Module]:
    norms = _norms_of(block)
    if isinstance(norm_index, str):
        for name, module in norms:
            if name == norm_index:
                return name, module
        raise ValueError(f"convert(): block {block_name} has no norm {norm_index!r}; its norms: "
                         f"{', '.join(name for name, _ in norms) or 'none'}")
    try:
        return norms[norm_index]
    except IndexError:
        raise ValueError(f"convert(): block {block_name} has {len(norms)} norms, norm_index={norm_index} is out "
                         "of range") from None
