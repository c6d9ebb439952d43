"""Analyses of models and runs: complexity (params/FLOPs)."""
from .complexity import Complexity, complexity

__all__ = ["Complexity", "complexity"]
