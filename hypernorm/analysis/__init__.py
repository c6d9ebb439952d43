"""Analyses of models and runs: complexity (params/FLOPs), experiment grids, result tables and figures.

Submodules load on first use, so the ``hypernorm`` command starts without torch: the counting function is
``hypernorm.complexity`` (or ``hypernorm.analysis.complexity.complexity``).
"""
import importlib

__all__ = ["Complexity"]


def __getattr__(name: str):  # PEP 562
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".complexity", __name__), name)
