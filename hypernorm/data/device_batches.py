"""Batches of an in-memory image set held whole on the training device (``data.on_device``).

For CIFAR on a GPU a ``DataLoader`` is the bottleneck: per-image crop and flip on the CPU, then a copy per batch.
Here the split lives on the device as uint8 (150 MB for CIFAR's train set, zero-padded once for the crop), and
each batch is one gather: the sampler's indices, a random 32x32 window of the image padded by 4 and a random
horizontal flip, the same distribution as ``cifar_train_transform``. The crops come from a generator of their
own, seeded by (seed, epoch), so a resumed run draws the same crops as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .cifar import TensorImageDataset

__all__ = ["DeviceBatches", "in_memory_tensors"]

PAD = 4


def in_memory_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of a :class:`TensorImageDataset` or a Subset of one; ValueError for anything else."""
    indices = None
    while isinstance(dataset, Subset):
        chosen = torch.as_tensor(dataset.indices, dtype=torch.long)
        indices = chosen if indices is None else chosen[indices]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorImageDataset):
        raise ValueError(f"data.on_device needs a data set held in memory as tensors (CIFAR), got "
                         f"{type(dataset).__name__}; set data.on_device=false")
    images, labels = dataset.images, dataset.labels
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images, labels


class DeviceBatches:
    """(uint8 images, int64 labels) batches on ``device`` in the order of ``sampler`` (or 0..N-1).

    ``augment``: random crop of the image zero-padded by 4 and horizontal flip, per sample. ``drop_last`` drops
    a final short batch (training: a batch of 1 would break batch norm). The sampler's epoch (its ``set_epoch``,
    as for a DataLoader) selects the crops, so each epoch draws new ones and a resumed epoch draws the same.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str,
                 sampler: Sequence[int] | None = None, augment: bool = False, drop_last: bool = False,
                 seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 (N, C, H, W) images and N labels, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.augment = augment
        self.size = images.shape[-2:]
        images = images.to(self.device)
        self.images = torch.nn.functional.pad(images, (PAD,) * 4) if augment else images
        self.labels = labels.to(self.device, torch.long)
        self.batch_size, self.sampler, self.drop_last, self.seed = batch_size, sampler, drop_last, seed

    def _order(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(len(self.labels), device=self.device)
        return torch.as_tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.labels)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        epoch = getattr(self.sampler, "epoch", 0)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + epoch) if self.augment else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            if self.augment:
                yield self._crop_flip(index, generator), self.labels[index]
            else:
                yield self.images[index], self.labels[index]

    def _crop_flip(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, (height, width) = len(index), self.size
        top = torch.randint(0, 2 * PAD + 1, (n, 1), device=self.device, generator=generator)
        left = torch.randint(0, 2 * PAD + 1, (n, 1), device=self.device, generator=generator)
        flip = torch.rand(n, 1, device=self.device, generator=generator) < 0.5
        rows = top + torch.arange(height, device=self.device)
        cols = left + torch.arange(width, device=self.device)
        cols = torch.where(flip, cols.flip(1), cols)
        # advanced indices around the channel slice: the result is (N, H, W, C)
        crops = self.images[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crops.permute(0, 3, 1, 2).contiguous()
