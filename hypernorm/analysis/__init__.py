"""Analyses of models and runs: complexity (params/FLOPs), experiment grids, result tables and figures."""
from .complexity import Complexity, complexity

__all__ = ["Complexity", "complexity"]
