"""Detection: Faster R-CNN ResNet-FPN (torchvision) with HyperNorm in the backbone and the neck/head, on COCO.

The names below load on first use (PEP 562), so that ``import hypernorm.detection.cli`` (the ``hypernorm``
command's parser) loads neither torch nor pycocotools.
"""
import importlib

_EXPORTS = {
    "CocoDetection": "data", "collate": "data", "detection_transforms": "data", "load_coco": "data",
    "DEFAULT_DETECTION_CONFIG": "schema", "load_detection_config": "schema", "resolve_detection_config": "schema",
    "evaluate_checkpoint": "engine", "train": "engine",
    # not the function evaluate: once the submodule of that name is imported, Python binds the module here
    "METRICS": "evaluate", "coco_evaluate": "evaluate", "format_table": "evaluate",
    "predict": "evaluate", "to_coco_results": "evaluate",
    "TABLE2_PAIRS": "model", "backbone_norm_names": "model", "create_detector": "model",
    "detector_parameter_counts": "model", "neck_norm_names": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
