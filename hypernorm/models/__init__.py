"""The model zoo: builders named after the paper's networks, behind one factory.

Names load on first use (the builders register themselves then), so that the command line pays for torch only
when a command runs.
"""
import importlib

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]


def __getattr__(name: str):  # PEP 562
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for builders in ("cifar_resnet", "cifar_resnext", "resnet", "shufflenet"):
        importlib.import_module(f".{builders}", __name__)
    return getattr(importlib.import_module(".registry", __name__), name)
