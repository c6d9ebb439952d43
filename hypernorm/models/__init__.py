"""The model zoo: builders named after the paper's networks, behind one factory."""
from . import cifar_resnet, cifar_resnext, resnet, shufflenet  # noqa: F401  (register the networks)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
