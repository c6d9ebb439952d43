"""Analyses of models and runs: complexity (params/FLOPs), experiment grids, result tables and figures.

Submodules load on first use (PEP 562), so the ``hypernorm`` command starts without torch. The counting
function is ``hypernorm.complexity`` (``hypernorm.analysis.complexity`` is its module).
"""
import importlib

__all__ = ["Complexity"]
_SUBMODULES = ("aggregate", "commands", "complexity", "diagnostics", "plots", "runner")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in __all__:
        return getattr(importlib.import_module(".complexity", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
