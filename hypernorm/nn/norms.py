"""Registry of the plain normalization layers that HyperNorm wraps, keyed by short names."""
from __future__ import annotations

import copy
import math
from typing import Callable

from torch import nn
from torchvision.models.convnext import LayerNorm2d

from .replace import copy_norm_state
from .sync_batchnorm import CPUSyncBatchNorm

__all__ = [
    "register_norm",
    "register_norm_type",
    "syncs_across_processes",
    "create_base_norm",
    "base_norm_names",
    "is_norm",
    "standardizer_like",
    "gn_groups",
    "norm_width",
    "normalizes_last_dim",
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


def syncs_across_processes(module: nn.Module) -> bool:
    """True for batch norms whose training statistics are reduced over all processes (torch's SyncBatchNorm and
    the CPU stand-in): they train with one sample per process when there are several processes."""
    return isinstance(module, (nn.SyncBatchNorm, CPUSyncBatchNorm))


def standardizer_like(norm: nn.Module, check_only: bool = False) -> nn.Module | None:
    """A copy of ``norm`` without affine parameters, keeping its running statistics (with ``check_only``:
    None, having checked that such a copy can be made)."""
    for cls in type(norm).__mro__:
        if cls in _STRIP_AFFINE:
            return None if check_only else _STRIP_AFFINE[cls](norm)
    raise TypeError(f"HyperNorm cannot wrap {type(norm).__name__}: no affine-free copy is registered for it")


def norm_width(norm: nn.Module) -> int:
    """The channel count C that ``norm`` normalizes."""
    for attr in ("num_features", "num_channels"):
        if hasattr(norm, attr):
            return int(getattr(norm, attr))
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return int(norm.normalized_shape[0])
    raise ValueError(f"cannot tell the channel count of {type(norm).__name__}"
                     + (f" over {tuple(norm.normalized_shape)}" if isinstance(norm, nn.LayerNorm) else ""))


def normalizes_last_dim(norm: nn.Module) -> bool:
    """True for a LayerNorm over the last dim of (N, ..., C): channels-last maps (ConvNeXt, Swin) or tokens
    (ViT). The LayerNorm2d classes of torchvision and timm take (N, C, H, W) like the other norms."""
    return isinstance(norm, nn.LayerNorm) and not type(norm).__name__.endswith("2d")


def gn_groups(num_features: int, max_groups: int = 32) -> int:
    """32 groups as in Wu & He (2018); fewer, dividing the channels, for narrow layers."""
    return math.gcd(max_groups, num_features)


def _strip_norm_base(norm: nn.modules.batchnorm._NormBase) -> nn.Module:
    kwargs = dict(eps=norm.eps, momentum=norm.momentum, affine=False,
                  track_running_stats=norm.track_running_stats)
    if hasattr(norm, "process_group"):  # SyncBatchNorm, CPUSyncBatchNorm
        kwargs["process_group"] = norm.process_group
    # the registered class, not a subclass such as timm's BatchNormAct2d (whose activation convert() keeps)
    cls = next(c for c in type(norm).__mro__ if c in _STRIP_AFFINE)
    return copy_norm_state(norm, cls(norm.num_features, **kwargs))


def _strip_groupnorm(norm: nn.GroupNorm) -> nn.Module:
    return nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)


def _strip_layernorm(norm: nn.LayerNorm) -> nn.Module:
    """A copy of any LayerNorm (channels-last, tokens, or a LayerNorm2d subclass) without its affine."""
    stripped = copy.deepcopy(norm)
    stripped.register_parameter("weight", None)
    stripped.register_parameter("bias", None)
    stripped.elementwise_affine = False
    return stripped


register_norm("bn", nn.BatchNorm2d, lambda c, affine: nn.BatchNorm2d(c, affine=affine), _strip_norm_base)
register_norm("syncbn", nn.SyncBatchNorm, lambda c, affine: nn.SyncBatchNorm(c, affine=affine), _strip_norm_base)
# What engine/detection swap "syncbn" for in CPU process groups (hypernorm.nn.use_cpu_sync_batchnorm).
register_norm_type(CPUSyncBatchNorm, _strip_norm_base)
register_norm("gn", nn.GroupNorm, lambda c, affine: nn.GroupNorm(gn_groups(c), c, affine=affine), _strip_groupnorm)
# Layer norm over (C, H, W) for feature maps is GroupNorm with one group.
register_norm("ln", nn.GroupNorm, lambda c, affine: nn.GroupNorm(1, c, affine=affine))
register_norm("in", nn.InstanceNorm2d, lambda c, affine: nn.InstanceNorm2d(c, affine=affine), _strip_norm_base)
# Layer norm over the channels only, at every position (ConvNeXt's): torchvision's LayerNorm2d on (N, C, H, W).
register_norm("cln", LayerNorm2d, lambda c, affine: LayerNorm2d(c, eps=1e-6, elementwise_affine=affine), _strip_layernorm)
_STRIP_AFFINE[nn.LayerNorm] = _strip_layernorm  # channels-last and token LayerNorms, kept as they are
