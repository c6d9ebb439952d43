"""Tiny CIFAR data sets written by the tests: the official python pickle layout and the npz layout."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
from torchvision import datasets

CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def make_images(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32, 3) images whose mean colour depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    colours = np.linspace(20, 235, num_classes)[labels]
    images = rng.normal(colours[:, None, None, None], 30, size=(n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_official(root: Path, name: str = "cifar10", n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict:
    """Write ``root/<base_folder>/`` as the official archive extracts it; returns the arrays written and the
    md5 lists to patch into torchvision's dataset class (the real lists name the real files)."""
    cls = CLASSES[name]
    folder = Path(root) / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = 10 if name == "cifar10" else 100
    x_train, y_train = make_images(n_train, num_classes, seed)
    x_test, y_test = make_images(n_test, num_classes, seed + 1)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def dump(filename: str, x: np.ndarray, y: np.ndarray) -> list[str]:
        entry = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), label_key: y.tolist(),
                 "filenames": [f"{i}.png" for i in range(len(x))]}
        if name == "cifar100":
            entry["coarse_labels"] = (y // 5).tolist()
        path = folder / filename
        with open(path, "wb") as f:
            pickle.dump(entry, f)
        return [filename, _md5(path)]

    train_files = [f for f, _ in cls.train_list]
    parts = np.array_split(np.arange(n_train), len(train_files))
    train_list = [dump(f, x_train[p], y_train[p]) for f, p in zip(train_files, parts)]
    test_list = [dump(cls.test_list[0][0], x_test, y_test)]
    meta = {cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump(meta, f)
    meta_info = {**cls.meta, "md5": _md5(folder / cls.meta["filename"])}
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "folder": folder,
            "train_list": train_list, "test_list": test_list, "meta": meta_info}


def patch_checksums(monkeypatch, name: str, written: dict) -> None:
    """Make torchvision's integrity check expect the fixture's md5s; the check itself still runs."""
    cls = CLASSES[name]
    monkeypatch.setattr(cls, "train_list", written["train_list"])
    monkeypatch.setattr(cls, "test_list", written["test_list"])
    monkeypatch.setattr(cls, "meta", written["meta"])


def write_npz(root: Path, name: str = "cifar10", n_train: int = 60, n_test: int = 20, sort: bool = True) -> dict:
    """``root/<name>.npz`` like the shared CIFAR-10 copy: class-sorted when ``sort``."""
    num_classes = 10 if name == "cifar10" else 100
    x_train, y_train = make_images(n_train, num_classes, 0)
    x_test, y_test = make_images(n_test, num_classes, 1)
    if sort:
        order = np.argsort(y_train, kind="stable")
        x_train, y_train = x_train[order], y_train[order]
    arrays = {"x_train": x_train, "y_train": y_train.astype(np.int16), "x_test": x_test,
              "y_test": y_test.astype(np.int16), "class_names": np.array([f"c{i}" for i in range(num_classes)])}
    Path(root).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(Path(root) / f"{name}.npz", **arrays)
    return arrays


def tiny_config(root, out, **sections):
    """A config dict for a 1-epoch resnet20 run on the fixture; ``sections`` update it (e.g. train={...})."""
    config = {
        "model": {"name": "resnet20", "norm": "bn"},
        "data": {"dataset": "cifar10", "root": str(root), "workers": 0, "download": False},
        # one thread: tiny batches gain nothing from two, and a busy shared CPU makes two threads crawl
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1},
        "optim": {"lr": 0.05, "sched": "cosine", "weight_decay": 5e-4},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config
