"""Detection: Faster R-CNN ResNet-FPN (torchvision) with HyperNorm in the backbone and the neck/head, on COCO."""
from .data import CocoDetection, collate, detection_transforms, load_coco
from .engine import DEFAULT_DETECTION_CONFIG, evaluate_checkpoint, train
from .evaluate import METRICS, coco_evaluate, evaluate, format_table, predict, to_coco_results
from .model import TABLE2_PAIRS, backbone_norm_names, create_detector, detector_parameter_counts, neck_norm_names

__all__ = [
    "DEFAULT_DETECTION_CONFIG",
    "METRICS",
    "TABLE2_PAIRS",
    "CocoDetection",
    "backbone_norm_names",
    "coco_evaluate",
    "collate",
    "create_detector",
    "detection_transforms",
    "detector_parameter_counts",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "load_coco",
    "neck_norm_names",
    "predict",
    "to_coco_results",
    "train",
]
