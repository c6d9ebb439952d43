"""Training and evaluation of classifiers: ``train(config)``, ``evaluate_checkpoint(path)``, DDP, checkpoints.

Names are imported on first use (PEP 562), so that ``import hypernorm.engine.cli`` does not load torch.
"""
import importlib

_EXPORTS = {
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "DistEnv": "distributed", "setup_distributed": "distributed",
    "CPUSyncBatchNorm": "sync_batchnorm", "use_cpu_sync_batchnorm": "sync_batchnorm",
    "DEFAULT_CONFIG": "trainer", "BEST_NOTE": "trainer", "METRIC_FIELDS": "trainer",
    "RESUMABLE_DIFFERENCES": "trainer", "evaluate": "trainer",
    "evaluate_checkpoint": "trainer", "lr_factor": "trainer", "resolve_config": "trainer", "train": "trainer",
}

_RENAMED = {"resolve_config": "_resolve"}  # defaults filled in and validated, as train() uses it

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value
