"""``build_datasets(config)``: the train and test sets a config names, and what the engine needs to know."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ..config import DATA_ENV
from .cifar import CIFAR_STATS, TensorImageDataset, load_cifar
from .imagenet import IMAGENET_STATS, imagenet_folder

__all__ = ["DatasetInfo", "build_dataset", "build_datasets", "resolve_root", "cifar_train_transform", "Normalize"]

SUBSET_SEED = 0  # data.train_subset picks the same images whatever train.seed is, so runs stay comparable


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # the data set really used: cifar10, cifar100, imagenet
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where it came from, for logs and summaries


def resolve_root(root: str | os.PathLike | None) -> Path:
    """data.root, else $HYPERNORM_DATA, else ./data."""
    if root is None:
        root = os.environ.get(DATA_ENV) or "data"
    return Path(root).expanduser()


def cifar_train_transform() -> v2.Compose:
    """Random 32x32 crop of the image zero-padded by 4, and a horizontal flip, on uint8 tensors."""
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


class Normalize(torch.nn.Module):
    """uint8 batch -> float, scaled to [0, 1] and standardized per channel (runs on the training device)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def build_dataset(data: dict[str, Any], train: bool) -> tuple[Dataset, DatasetInfo]:
    """The train or test set named by the ``data`` section of a config. Items are (uint8 image, label)."""
    name = data["dataset"]
    root = resolve_root(data["root"])
    if name in CIFAR_STATS:
        images, labels, classes, source = load_cifar(name, root, train=train, download=data["download"])
        transform = cifar_train_transform() if train and data["augment"] else None
        dataset: Dataset = TensorImageDataset(images, labels, transform, classes)
        mean, std = CIFAR_STATS[name]
    elif name == "imagenet":
        dataset = imagenet_folder(root, train=train, augment=data["augment"], image_size=data["image_size"] or 224)
        classes, (mean, std) = dataset.classes, IMAGENET_STATS
        source = f"ImageNet folders at {root}"
    else:
        raise ValueError(f"unknown data.dataset {name!r}; choose cifar100, cifar10 or imagenet")
    subset = data["train_subset"]
    if train and subset is not None:
        if subset > len(dataset):
            raise ValueError(f"data.train_subset={subset} exceeds the {len(dataset)} training images of {name}")
        # A random subset: the npz copy of CIFAR-10 is sorted by class, so a prefix would miss classes.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
        dataset = Subset(dataset, order[:subset].tolist())
        source += f" (random {subset}-image train subset, seed {SUBSET_SEED})"
    return dataset, DatasetInfo(name, len(classes), tuple(mean), tuple(std), source)


def build_datasets(data: dict[str, Any]) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train set, test set, info) for the ``data`` section of a config."""
    train, info = build_dataset(data, train=True)
    test, test_info = build_dataset(data, train=False)
    if test_info.num_classes != info.num_classes:
        raise ValueError(f"{info.name}: the train and test sets have different classes ({info.num_classes} vs "
                         f"{test_info.num_classes}); both need the same class folders")
    return train, test, info
