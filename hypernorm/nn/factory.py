"""Norm names -> layers: "bn", "gn", ... their HyperNorm forms "bhn", "ghn", ... and the no-relay ablation of
each HyperNorm form, "bhn_norelay", ... (the same LSTM, its state reset to zero at every block)."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from .hypernorm import HyperNorm
from .norms import base_norm_names, create_base_norm

__all__ = ["norm_names", "split_norm_name", "split_relay", "create_norm_layer", "get_norm_layer", "NO_RELAY_SUFFIX"]

NO_RELAY_SUFFIX = "_norelay"


def norm_names(ablations: bool = False) -> list[str]:
    """Every valid norm name: the base norms and their HyperNorm forms ("bn" -> "bhn"); with ``ablations``
    also the no-relay forms ("bhn_norelay")."""
    base = base_norm_names()
    hyper = [name[:-1] + "hn" for name in base]
    return base + hyper + ([name + NO_RELAY_SUFFIX for name in hyper] if ablations else [])


def split_relay(name: str) -> tuple[str, bool]:
    """"bhn_norelay" -> ("bhn", False); "bhn" -> ("bhn", True): the name without the suffix, and whether the
    HyperNorm layers relay their LSTM state from block to block."""
    if name.endswith(NO_RELAY_SUFFIX):
        return name[:-len(NO_RELAY_SUFFIX)], False
    return name, True


def split_norm_name(name: str) -> tuple[str, bool]:
    """"bhn" -> ("bn", True); "gn" -> ("gn", False); "bhn_norelay" -> ("bn", True) (:func:`split_relay` tells
    the relay apart). Raises with the valid names otherwise."""
    base = base_norm_names()
    stem, relayed = split_relay(name)
    if stem in base and relayed:
        return stem, False
    if stem.endswith("hn") and stem[:-2] + "n" in base:
        return stem[:-2] + "n", True
    raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(norm_names(ablations=True))} "
                     f"({NO_RELAY_SUFFIX!r} only follows a HyperNorm name)")


def create_norm_layer(name: str, num_features: int, **kwargs) -> nn.Module:
    """One layer: a base norm with affine, or a stand-alone HyperNorm (a private LSTM; a "_norelay" name keeps
    its state at zero should :func:`hypernorm.nn.share_relay` later join it to a stage)."""
    base, hyper = split_norm_name(name)
    if hyper:
        return HyperNorm(num_features, norm=base, relayed=split_relay(name)[1], **kwargs)
    return create_base_norm(base, num_features, **kwargs)


def get_norm_layer(name: str) -> Callable[..., nn.Module]:
    """A ``norm_layer`` callable for model constructors (timm/torchvision style)."""
    split_norm_name(name)  # fail early on a bad name
    return partial(create_norm_layer, name)
