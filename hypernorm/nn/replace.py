"""Model surgery shared by conversion, the SN/SyncBN swaps and the standardizer copies."""
from __future__ import annotations

from torch import nn

__all__ = ["replace_module", "copy_norm_state"]

AFFINE_KEYS = ("weight", "bias")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of ``model``'s submodule ``name`` (qualified, e.g. "layer1.0.bn1"); returns the old one."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(attr)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}") from None
    setattr(parent, attr, new)
    return old


def copy_norm_state(source: nn.Module, target: nn.Module, affine: bool = False) -> nn.Module:
    """Copy ``source``'s state (running statistics, counters, learned mixtures) into ``target`` and its
    train/eval mode; its weight and bias too when ``affine``. Returns ``target``."""
    state = source.state_dict()
    if not affine:
        state = {key: value for key, value in state.items() if key not in AFFINE_KEYS}
    target.load_state_dict(state)
    target.train(source.training)
    return target
