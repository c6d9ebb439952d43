"""Detection: Faster R-CNN ResNet-FPN (torchvision) with HyperNorm in the backbone and the neck/head, on COCO."""
from .model import TABLE2_PAIRS, backbone_norm_names, create_detector, detector_parameter_counts, neck_norm_names

__all__ = [
    "TABLE2_PAIRS",
    "backbone_norm_names",
    "create_detector",
    "detector_parameter_counts",
    "neck_norm_names",
]
