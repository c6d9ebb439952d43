"""The model zoo: builders named after the paper's networks, behind one factory."""
from . import cifar_resnet  # noqa: F401  (registers the CIFAR networks)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
