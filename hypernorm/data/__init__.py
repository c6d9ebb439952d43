"""Data sets and transforms: CIFAR-10/100 (official archives or npz) and ImageNet folders."""
from .build import DatasetInfo, Normalize, build_dataset, build_datasets, cifar_train_transform, resolve_root
from .device_batches import DeviceBatches, in_memory_tensors
from .cifar import CIFAR_STATS, TensorImageDataset, load_cifar
from .imagenet import IMAGENET_STATS, imagenet_folder, imagenet_transform

__all__ = [
    "CIFAR_STATS",
    "DatasetInfo",
    "DeviceBatches",
    "IMAGENET_STATS",
    "Normalize",
    "TensorImageDataset",
    "build_dataset",
    "build_datasets",
    "cifar_train_transform",
    "imagenet_folder",
    "imagenet_transform",
    "in_memory_tensors",
    "load_cifar",
    "resolve_root",
]
