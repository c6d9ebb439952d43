"""Norm names -> layers: "bn", "gn", ... and their HyperNorm forms "bhn", "ghn", ..."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from .hypernorm import HyperNorm
from .norms import base_norm_names, create_base_norm

__all__ = ["norm_names", "split_norm_name", "create_norm_layer", "get_norm_layer"]


def norm_names() -> list[str]:
    """Every valid norm name: the base norms and their HyperNorm forms ("bn" -> "bhn")."""
    base = base_norm_names()
    return base + [name[:-1] + "hn" for name in base]


def split_norm_name(name: str) -> tuple[str, bool]:
    """"bhn" -> ("bn", True); "gn" -> ("gn", False). Raises with the valid names otherwise."""
    base = base_norm_names()
    if name in base:
        return name, False
    if name.endswith("hn") and name[:-2] + "n" in base:
        return name[:-2] + "n", True
    raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(norm_names())}")


def create_norm_layer(name: str, num_features: int, **kwargs) -> nn.Module:
    """One layer: a base norm with affine, or a stand-alone HyperNorm (a private LSTM, no relay)."""
    base, hyper = split_norm_name(name)
    if hyper:
        return HyperNorm(num_features, norm=base, **kwargs)
    return create_base_norm(base, num_features, **kwargs)


def get_norm_layer(name: str) -> Callable[..., nn.Module]:
    """A ``norm_layer`` callable for model constructors (timm/torchvision style)."""
    split_norm_name(name)  # fail early on a bad name
    return partial(create_norm_layer, name)
