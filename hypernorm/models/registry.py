"""``create_model(name, norm=...)`` and ``list_models()``: every network of the paper in every norm."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..nn import convert, get_norm_layer, split_norm_name
from .external import create_external_model, is_external

__all__ = ["register_model", "create_model", "list_models", "model_info", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]  # builder(norm_layer=..., num_classes=..., **kwargs)
    input_size: int  # square input resolution the network is designed for
    num_classes: int  # default head size (the paper's data set)
    convert_options: dict[str, Any] = field(default_factory=dict)  # how HyperNorm goes into its blocks


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, *, input_size: int, num_classes: int, **convert_options: Any):
    """Decorator for a builder ``f(norm_layer, num_classes, **kwargs) -> nn.Module`` made of base norms."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelInfo(name, builder, input_size, num_classes, dict(convert_options))
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}, or any "
                         "'timm/<name>' or 'torchvision/<name>'") from None


def create_model(name: str, norm: str = "bn", num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build ``name`` with its norms of type ``norm``.

    A HyperNorm name ("bhn", "ghn", "syncbhn", ...) builds the network with the base norm ("bn", "gn",
    "syncbn", ...) and converts one norm per building block to the relayed HyperNorm, as in the paper.
    "timm/<name>" and "torchvision/<name>" build that library's model with random weights (see
    :func:`hypernorm.models.external.create_external_model`; there ``norm`` may also be "hn").
    """
    if is_external(name):
        return create_external_model(name, norm, 1000 if num_classes is None else num_classes, **kwargs)
    info = model_info(name)
    base, hyper = split_norm_name(norm)
    model = info.builder(norm_layer=get_norm_layer(base),
                         num_classes=info.num_classes if num_classes is None else num_classes, **kwargs)
    if hyper:
        convert(model, norm, **info.convert_options)
    return model
