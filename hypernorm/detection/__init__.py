"""Detection: Faster R-CNN ResNet-FPN (torchvision) with HyperNorm in the backbone and the neck/head, on COCO.

Names are imported on first use, so that the command line and config loading do not pay for torch.
"""
import importlib

_EXPORTS = {
    "CocoDetection": "data", "collate": "data", "detection_transforms": "data", "load_coco": "data",
    "DEFAULT_DETECTION_CONFIG": "schema", "load_detection_config": "schema", "resolve_detection_config": "schema",
    "evaluate_checkpoint": "engine", "train": "engine",
    # the function evaluate stays at hypernorm.detection.evaluate.evaluate: the submodule's name shadows it here
    "METRICS": "evaluate", "coco_evaluate": "evaluate", "format_table": "evaluate",
    "predict": "evaluate", "to_coco_results": "evaluate",
    "TABLE2_PAIRS": "model", "backbone_norm_names": "model", "create_detector": "model",
    "detector_parameter_counts": "model", "neck_norm_names": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # PEP 562: the submodule is imported on first use of one of its names
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
