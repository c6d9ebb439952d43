"""hypernorm: HyperNorm (HN) and batch HyperNorm (BHN), a drop-in normalization with a relayed meta LSTM.

The public names load on first use (PEP 562), so that the ``hypernorm`` command starts without torch.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "HyperNorm": "hypernorm.nn",
    "convert": "hypernorm.nn",
    "complexity": "hypernorm.analysis.complexity",
    "create_model": "hypernorm.models",
    "list_models": "hypernorm.models",
}

__all__ = ["HyperNorm", "complexity", "convert", "create_model", "list_models", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
