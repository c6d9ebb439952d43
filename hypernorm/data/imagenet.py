"""ImageNet (or any classification set) from an ImageFolder directory: ``root/train/<class>/*`` and
``root/val/<class>/*``. torchvision.datasets.ImageNet can build that layout from the official archives."""
from __future__ import annotations

import os
from pathlib import Path

from torchvision import datasets
from torchvision.transforms import v2

__all__ = ["IMAGENET_STATS", "imagenet_folder", "imagenet_transform"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def imagenet_transform(train: bool, augment: bool, image_size: int = 224) -> v2.Compose:
    """Random-resized crop + flip for training; resize to 8/7 of the size + center crop otherwise. The result is
    a uint8 tensor; normalization happens per batch on the device."""
    if train and augment:
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*ops, v2.PILToTensor()])


def imagenet_folder(root: str | os.PathLike, train: bool, augment: bool = True, image_size: int = 224
                    ) -> datasets.ImageFolder:
    split = "train" if train else "val"
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet split {split!r} not found: expected an ImageFolder directory {folder} with one sub-folder of "
            f"images per class (train/ and val/ side by side). Prepare it from the official ILSVRC2012 archives "
            f"(torchvision.datasets.ImageNet(root, split=...) sorts the val images into class folders) and point "
            f"data.root or $HYPERNORM_DATA at its parent.")
    try:
        return datasets.ImageFolder(str(folder), transform=imagenet_transform(train, augment, image_size))
    except FileNotFoundError as err:  # ImageFolder found no class folders or no images
        raise FileNotFoundError(f"ImageNet split {split!r} in {folder} holds no images in class sub-folders "
                                f"({err})") from None

