"""CIFAR-10/100: the official python archives through torchvision (md5-checked, downloaded when online), or a
``<dataset>.npz`` file (x_train, y_train, x_test, y_test as uint8 HWC images and integer labels) in the data root.

Both give the whole split as one uint8 (N, 3, 32, 32) tensor; augmentation then runs on uint8 tensors and the
float conversion + mean/std normalization happens per batch on the training device (cheap on 2 CPU cores).
"""
from __future__ import annotations

import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

__all__ = ["TensorImageDataset", "load_cifar", "CIFAR_STATS"]

# Per-channel mean/std of the train sets (the commonly quoted values).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_TORCHVISION = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


class TensorImageDataset(Dataset):
    """(uint8 image tensor, label) pairs from in-memory tensors, with an optional tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 (N, C, H, W) images and N labels, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def load_cifar(name: str, root: str | os.PathLike, train: bool, download: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(uint8 images (N, 3, 32, 32), int64 labels, class names, source description) of one split.

    ``root/<name>.npz`` is used when present; otherwise the official archive under ``root`` via torchvision.
    """
    if name not in _TORCHVISION:
        raise ValueError(f"unknown CIFAR data set {name!r}; choose cifar10 or cifar100")
    root = Path(root)
    npz = root / f"{name}.npz"
    if npz.is_file():
        return _load_npz(npz, name, train)
    return _load_official(name, root, train, download)


def _load_official(name: str, root: Path, train: bool, download: bool):
    cls = _TORCHVISION[name]
    folder = root / cls.base_folder
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    if not download:
        _check_files(name, root, folder, files)
    try:
        dataset = cls(str(root), train=train, download=download)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        # Download failed (offline) or the files are still missing/corrupt after it.
        raise FileNotFoundError(f"{_TITLE[name]} could not be obtained under {folder} ({err}){_npz_hint(root)}. "
                                f"{_how_to_get(name, root)}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise ValueError(f"{_TITLE[name]} under {folder} passed its checksums but cannot be read ({err!r}); delete "
                         f"the folder and download the archive again. {_how_to_get(name, root)}") from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images, labels, list(dataset.classes), f"{_TITLE[name]} official archive at {folder}"


def _check_files(name: str, root: Path, folder: Path, files: list[list[str]]) -> None:
    missing = [f for f, _ in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{_TITLE[name]} not found: expected {', '.join(missing)} in {folder}"
                                f"{_npz_hint(root)}. {_how_to_get(name, root)}")
    corrupt = [f for f, md5 in files if not check_integrity(str(folder / f), md5)]
    if corrupt:
        raise ValueError(
            f"{_TITLE[name]} is corrupt: {', '.join(str(folder / f) for f in corrupt)} failed the md5 check against "
            f"the official archive. Delete {folder} and extract the official archive again. {_how_to_get(name, root)}")


def _npz_hint(root: Path) -> str:
    """Point at another data set's npz in the same folder (here: CIFAR-10 where CIFAR-100 was asked for)."""
    others = sorted(p.name for p in root.glob("*.npz")) if root.is_dir() else []
    return f" (this folder holds {', '.join(others)}: set data.dataset to match it)" if others else ""


def _how_to_get(name: str, root: Path) -> str:
    cls = _TORCHVISION[name]
    return (f"Get it with data.download=true on a machine with internet, or download {cls.url} and extract it in "
            f"{root} (giving {root / cls.base_folder}); point data.root or $HYPERNORM_DATA at the folder that "
            f"holds {cls.base_folder}/" + (f" or {name}.npz" if name == "cifar10" else "") + ".")


def _load_npz(path: Path, name: str, train: bool):
    split = "train" if train else "test"
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or not a numpy .npz archive ({err}); replace it with a good copy") from None
    with archive:
        missing = {f"x_{split}", f"y_{split}"} - set(archive.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {', '.join(sorted(missing))}; expected x_train, y_train, "
                             "x_test, y_test (uint8 NHWC images, integer labels)")
        try:
            x, y = archive[f"x_{split}"], archive[f"y_{split}"]
            classes = [str(c) for c in archive["class_names"]] if "class_names" in archive.files else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path} is corrupt ({err}); replace it with a good copy") from None
    num_classes = 10 if name == "cifar10" else 100
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ValueError(f"{path}: x_{split} must be uint8 (N, 32, 32, 3) with N labels, got {x.dtype} {x.shape} "
                         f"and {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{path}: x_{split} holds no images; expected the {split} split of {_TITLE[name]}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # the (N, 1) label column of some CIFAR copies
    if y.dtype.kind not in "iu" or y.ndim != 1:
        # float labels would be truncated to classes silently
        raise ValueError(f"{path}: y_{split} must be N integer class labels, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{path}: y_{split} labels must lie in 0..{num_classes - 1} for {_TITLE[name]}")
    if classes is not None and len(classes) != num_classes:  # e.g. CIFAR-10 arrays saved as cifar100.npz
        raise ValueError(f"{path}: class_names lists {len(classes)} classes, but {_TITLE[name]} has {num_classes}; "
                         f"is it the npz of another data set?")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(y.astype(np.int64))
    classes = classes or [str(i) for i in range(num_classes)]
    return images, labels, classes, f"{_TITLE[name]} from {path}"
