"""Plug-and-play conversion: put one relayed HyperNorm in every building block of an existing model."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .factory import split_norm_name, split_relay
from .hypernorm import HyperNorm, share_relay
from .norms import create_base_norm, is_norm, standardizer_like
from .replace import copy_norm_state, replace_module

__all__ = ["convert", "find_stages"]


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


def find_stages(model: nn.Module) -> list[str]:
    """Names of the stages: the outermost Sequential/ModuleList whose children are blocks of one type,
    each holding norm layers (ResNet's ``layer1``..``layer4``, ShuffleNetV2's ``stage2``..``stage4``)."""
    stages: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(stage + ".") for stage in stages):
            continue
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) == 0:
            continue
        blocks = list(module.children())
        if len({type(block) for block in blocks}) == 1 and not is_norm(blocks[0]) \
                and not isinstance(blocks[0], HyperNorm) and all(_norms_of(block) for block in blocks):
            stages.append(name)
    return stages


def _standardizer(old: nn.Module, base: str | None) -> nn.Module:
    """An affine-free norm for the new HyperNorm: a copy of ``old`` (base None), or a fresh ``base`` norm
    that takes over ``old``'s running statistics when both are batch norms."""
    if base is None:
        return standardizer_like(old)
    new = create_base_norm(base, _width(old), affine=False)
    if isinstance(new, nn.modules.batchnorm._BatchNorm) and isinstance(old, nn.modules.batchnorm._BatchNorm) \
            and old.track_running_stats and new.track_running_stats:
        return copy_norm_state(old, new)
    new.train(old.training)
    return new


def _width(norm: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(norm, attr):
            return int(getattr(norm, attr))
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[0])
    raise TypeError(f"cannot tell the channel count of {type(norm).__name__}")


def convert(
    model: nn.Module,
    norm: str = "bhn",
    *,
    stages: Sequence[str] | None = None,
    norm_index: int | str = 0,
    skip: Callable[[nn.Module], bool] | None = None,
    reduction: int = 4,
) -> nn.Module:
    """Replace one norm per building block of ``model`` with a HyperNorm sharing its stage's LSTM.

    Args:
        norm: "hn" keeps each replaced norm's own type (BN -> BHN, GN -> GHN, running statistics kept);
            a HyperNorm name ("bhn", "syncbhn", "ghn", ...) sets the standardizer; with "_norelay" ("bhn_norelay")
            every block's LSTM step starts from zero state (the no-relay ablation, same parameters).
        stages: qualified names of the stage containers; found by :func:`find_stages` when omitted.
        norm_index: which norm of a block: its position among the block's norms (0 = first, -1 = last)
            or its name inside the block (e.g. "bn2").
        skip: blocks for which it returns True keep their norms (for example ShuffleNetV2's
            down-sampling units, whose first norm is narrower than the stage).
        reduction: bottleneck ratio of the LSTM gate maps.

    The replaced norms' affine parameters are dropped; every other layer is untouched. The model is
    changed in place and returned.
    """
    if norm == "hn":
        base = None
    else:
        base, hyper = split_norm_name(norm)
        if not hyper:
            raise ValueError(f"convert() puts HyperNorm in place: norm must be 'hn' or a HyperNorm name, got {norm!r}")
    stage_names = list(stages) if stages is not None else find_stages(model)
    if not stage_names:
        raise ValueError(
            f"convert() found no stage in {type(model).__name__}: no Sequential/ModuleList of blocks holding norm "
            "layers. Pass stages=[...] with the names of the modules that hold the building blocks."
        )
    plan = [_plan_stage(model, name, norm_index, skip) for name in stage_names]  # validate before changing
    for stage_picks in plan:
        layers = []
        for block, norm_name, qualified, old in stage_picks:
            layer = HyperNorm(_width(old), _standardizer(old, base), reduction, name=qualified,
                              relayed=split_relay(norm)[1])
            replace_module(block, norm_name, layer)
            layers.append(layer)
        share_relay(layers)
    return model


def _plan_stage(model: nn.Module, stage_name: str, norm_index: int | str,
                skip: Callable[[nn.Module], bool] | None) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(block, norm name in block, qualified name, norm) for each block of the stage that gets a HyperNorm."""
    try:
        stage = model.get_submodule(stage_name)
    except AttributeError:
        raise ValueError(f"convert(): {type(model).__name__} has no stage {stage_name!r}") from None
    picks = []
    for block_name, block in stage.named_children():
        if skip is not None and skip(block):
            continue
        norm_name, old = _pick_norm(block, norm_index, f"{stage_name}.{block_name}")
        qualified = f"{stage_name}.{block_name}.{norm_name}"
        if isinstance(old, HyperNorm):
            raise ValueError(f"convert(): {qualified} is already a HyperNorm; the model was converted before")
        picks.append((block, norm_name, qualified, old))
    if not picks:
        raise ValueError(f"convert(): every block of stage {stage_name!r} was skipped")
    widths = {_width(old) for *_, old in picks}
    if len(widths) != 1:
        found = ", ".join(f"{qualified}({_width(old)})" for _, _, qualified, old in picks)
        raise ValueError(f"convert(): stage {stage_name!r} shares one LSTM, so its norms need one width; got "
                         f"{found}. Choose another norm_index, or skip= the odd blocks.")
    return picks


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
