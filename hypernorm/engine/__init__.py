"""Training and evaluation of classifiers: ``train(config)``, ``evaluate_checkpoint(path)``, DDP, checkpoints."""
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistEnv, setup_distributed
from .trainer import BEST_NOTE, METRIC_FIELDS, evaluate, evaluate_checkpoint, lr_factor, train

__all__ = [
    "BEST_NOTE",
    "DistEnv",
    "METRIC_FIELDS",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
