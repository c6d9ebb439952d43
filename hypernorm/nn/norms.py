"""Registry of the plain normalization layers that HyperNorm wraps, keyed by short names."""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from .replace import copy_norm_state
from .sync_batchnorm import CPUSyncBatchNorm

__all__ = [
    "register_norm",
    "register_norm_type",
    "create_base_norm",
    "base_norm_names",
    "is_norm",
    "standardizer_like",
    "gn_groups",
]

NormBuilder = Callable[[int, bool], nn.Module]  # (num_features, affine) -> layer

_BUILDERS: dict[str, NormBuilder] = {}
_TYPES: dict[str, type[nn.Module]] = {}
_STRIP_AFFINE: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_norm(
    name: str,
    cls: type[nn.Module],
    builder: NormBuilder,
    strip_affine: Callable[[nn.Module], nn.Module] | None = None,
) -> None:
    """Register a norm under ``name``; its HyperNorm form is then available as ``name[:-1] + "hn"``.

    ``strip_affine(layer)`` returns a copy of an existing layer without affine parameters (keeping its
    statistics); :func:`hypernorm.convert` uses it to wrap that layer type in place.
    """
    if not name.endswith("n"):
        raise ValueError(f"norm names end in 'n' so that the HyperNorm name is derivable, got {name!r}")
    _BUILDERS[name] = builder
    _TYPES[name] = cls
    if strip_affine is not None:
        _STRIP_AFFINE[cls] = strip_affine


def register_norm_type(cls: type[nn.Module], strip_affine: Callable[[nn.Module], nn.Module]) -> None:
    """Make a norm class known to :func:`is_norm` and :func:`standardizer_like` without a name of its own
    (for example a drop-in implementation of a registered norm)."""
    _TYPES[cls.__name__] = cls
    _STRIP_AFFINE[cls] = strip_affine


def base_norm_names() -> list[str]:
    return sorted(_BUILDERS)


def create_base_norm(name: str, num_features: int, affine: bool = True) -> nn.Module:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; valid base norms: {', '.join(base_norm_names())}") from None
    return builder(num_features, affine)


def is_norm(module: nn.Module) -> bool:
    """True for the normalization layers the registry knows (BN, SyncBN, GN, IN, LN, ...)."""
    return isinstance(module, tuple(_TYPES.values()) + (nn.LayerNorm,))


def standardizer_like(norm: nn.Module) -> nn.Module:
    """A copy of ``norm`` without affine parameters, keeping its running statistics."""
    for cls in type(norm).__mro__:
        if cls in _STRIP_AFFINE:
            return _STRIP_AFFINE[cls](norm)
    raise TypeError(f"HyperNorm cannot wrap {type(norm).__name__}: no affine-free copy is registered for it")


def gn_groups(num_features: int, max_groups: int = 32) -> int:
    """32 groups as in Wu & He (2018); fewer, dividing the channels, for narrow layers."""
    return math.gcd(max_groups, num_features)


def _strip_norm_base(norm: nn.modules.batchnorm._NormBase) -> nn.Module:
    kwargs = dict(eps=norm.eps, momentum=norm.momentum, affine=False,
                  track_running_stats=norm.track_running_stats)
    if hasattr(norm, "process_group"):  # SyncBatchNorm, CPUSyncBatchNorm
        kwargs["process_group"] = norm.process_group
    return copy_norm_state(norm, type(norm)(norm.num_features, **kwargs))


def _strip_groupnorm(norm: nn.GroupNorm) -> nn.Module:
    return nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)


register_norm("bn", nn.BatchNorm2d, lambda c, affine: nn.BatchNorm2d(c, affine=affine), _strip_norm_base)
register_norm("syncbn", nn.SyncBatchNorm, lambda c, affine: nn.SyncBatchNorm(c, affine=affine), _strip_norm_base)
# What engine/detection swap "syncbn" for in CPU process groups (hypernorm.nn.use_cpu_sync_batchnorm).
register_norm_type(CPUSyncBatchNorm, _strip_norm_base)
register_norm("gn", nn.GroupNorm, lambda c, affine: nn.GroupNorm(gn_groups(c), c, affine=affine), _strip_groupnorm)
# Layer norm over (C, H, W) for feature maps is GroupNorm with one group.
register_norm("ln", nn.GroupNorm, lambda c, affine: nn.GroupNorm(1, c, affine=affine))
register_norm("in", nn.InstanceNorm2d, lambda c, affine: nn.InstanceNorm2d(c, affine=affine), _strip_norm_base)
