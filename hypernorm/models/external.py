"""timm and torchvision models by name ("timm/convnext_atto", "torchvision/mobilenet_v2"), random weights,
in any norm: so the training command runs HyperNorm on today's architectures."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..nn import convert, create_base_norm, split_norm_name

__all__ = ["SOURCES", "is_external", "create_external_model", "convert_defaults"]

SOURCES = ("timm", "torchvision")

# Inverted residuals (MobileNet, EfficientNet) and dense layers have a first norm whose width changes from
# block to block (the expanded or concatenated input); their last norm has the stage's width and is the
# narrowest, so the relay covers whole stages at the smallest LSTM.
_LAST_NORM_FAMILIES = ("mobilenet", "efficientnet", "mnasnet", "densenet", "ghostnet", "mixnet", "tf_efficientnet")


def is_external(name: str) -> bool:
    return name.partition("/")[0] in SOURCES and "/" in name


def convert_defaults(name: str) -> dict[str, Any]:
    """The :func:`hypernorm.convert` options used for ``name`` (a model name with or without its source)."""
    model = name.rpartition("/")[2]
    return {"norm_index": -1} if model.startswith(_LAST_NORM_FAMILIES) else {}


def create_external_model(name: str, norm: str = "bn", num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """``name`` = "timm/<model>" or "torchvision/<model>", built with random weights (never downloaded).

    ``norm``: "bn" keeps the model's norms as its authors wrote them (BatchNorm in most CNNs, LayerNorm in
    ConvNeXt, Swin and ViT); another base norm ("gn", "syncbn", ...) replaces every ``BatchNorm2d``; "hn"
    converts with each norm's own kind (BN -> BHN, LayerNorm -> LayerNorm HN), and a HyperNorm name
    ("bhn", "ghn", ...) converts with that standardizer (see :func:`hypernorm.convert`).
    """
    source, _, model_name = name.partition("/")
    if source not in SOURCES or not model_name:
        raise ValueError(f"model {name!r}: expected 'timm/<name>' or 'torchvision/<name>'")
    if norm == "hn":
        base, hyper = "bn", True
    else:
        base, hyper = split_norm_name(norm)
    model = _build(source, model_name, num_classes, kwargs)
    if base != "bn":
        for qualified, module in list(model.named_modules()):
            if type(module) is nn.BatchNorm2d:
                parent, _, attr = qualified.rpartition(".")
                setattr(model.get_submodule(parent), attr, create_base_norm(base, module.num_features))
    if hyper:
        convert(model, norm, **convert_defaults(model_name))
    return model


def _build(source: str, model_name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        library = importlib.import_module(source)
    except ImportError:
        raise ValueError(f"model '{source}/{model_name}' needs {source}: pip install {source}") from None
    if source == "timm":
        if not library.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}; timm.list_models() names the valid ones")
        return library.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if model_name not in library.models.list_models():
        raise ValueError(f"unknown torchvision model {model_name!r}; valid: "
                         f"{', '.join(library.models.list_models(module=library.models))}")
    return library.models.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)
