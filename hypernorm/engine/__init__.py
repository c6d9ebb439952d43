"""Training and evaluation of classifiers: ``train(config)``, ``evaluate_checkpoint(path)``, DDP, checkpoints.

Names are imported on first use, so that the command line and config loading do not pay for torch.
"""
import importlib

_EXPORTS = {
    "BEST_NOTE": "trainer", "METRIC_FIELDS": "trainer", "evaluate": "trainer", "evaluate_checkpoint": "trainer",
    "train": "trainer",
    "fit": "loop", "lr_factor": "loop", "Task": "loop", "TrainParts": "loop", "TrainingDiverged": "loop",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "DistEnv": "distributed", "setup_distributed": "distributed", "process_group": "distributed",
    "DEFAULT_CONFIG": "schema", "RESUMABLE_DIFFERENCES": "schema", "resolve_config": "schema",
    "validate_config": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # PEP 562: the submodule is imported on first use of one of its names
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
