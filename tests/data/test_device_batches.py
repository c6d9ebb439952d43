"""data.on_device: batches gathered on the device are the sampler's images, cropped and flipped as the CPU
transform does, drawn again identically for a resumed epoch."""
import pytest
import torch
from torch.utils.data import DistributedSampler, Subset

from hypernorm.data import DeviceBatches, TensorImageDataset, in_memory_tensors


def _images(n=20, size=8):
    """Image i holds pixel values that name it: channel 0 = i, channels 1/2 = the row/column + 1."""
    rows = torch.arange(size).view(1, size, 1).expand(n, size, size)
    cols = torch.arange(size).view(1, 1, size).expand(n, size, size)
    ids = torch.arange(n).view(n, 1, 1).expand(n, size, size)
    return torch.stack([ids, rows + 1, cols + 1], 1).to(torch.uint8), torch.arange(n) * 3


def test_plain_batches_follow_the_sampler_and_keep_the_labels():
    images, labels = _images()
    sampler = DistributedSampler(TensorImageDataset(images, labels), num_replicas=2, rank=1, shuffle=True, seed=5)
    sampler.set_epoch(3)
    loader = DeviceBatches(images, labels, 4, "cpu", sampler=sampler)
    got = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()
    assert got == list(sampler) and len(loader) == 3
    for x, y in loader:
        assert torch.equal(y, x[:, 0, 0, 0].long() * 3)
        assert torch.equal(x, images[x[:, 0, 0, 0].long()])


def test_crops_are_windows_of_the_padded_image_flipped_half_the_time():
    images, labels = _images(n=64)
    loader = DeviceBatches(images, labels, 16, "cpu", augment=True, drop_last=True, seed=1)
    flips, offsets = 0, set()
    for x, y in loader:
        assert x.shape == (16, 3, 8, 8) and x.dtype == torch.uint8
        for img, label in zip(x, y):
            ident = img[0][img[1] > 0]  # pixels inside the image (row channel > 0), outside: zero padding
            assert ident.numel() > 0 and (ident.long() * 3 == label).all()
            r = img[1].max(1).values  # the row index + 1 of each output row, 0 in padding
            c = img[2].max(0).values
            inside_r, inside_c = r[r > 0].long(), c[c > 0].long()
            assert (inside_r.diff() == 1).all()  # rows in order: a crop, never a vertical flip
            step = inside_c.diff()
            assert (step == 1).all() or (step == -1).all()  # columns in order or reversed: the flip
            flips += int((step == -1).all() and len(step) > 0)
            offsets.add((int((r == 0)[:4].sum()) - int((r == 0)[4:].sum())))
    assert 12 <= flips <= 52  # 64 fair coins
    assert len(offsets) > 3  # several vertical offsets drawn


def test_each_epoch_draws_new_crops_and_a_resumed_epoch_the_same():
    images, labels = _images(n=32)
    sampler = DistributedSampler(TensorImageDataset(images, labels), num_replicas=1, rank=0, seed=0)

    def epoch(e, seed=7):
        loader = DeviceBatches(images, labels, 8, "cpu", sampler=sampler, augment=True, drop_last=True, seed=seed)
        sampler.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(2), epoch(2))
    assert not torch.equal(epoch(2), epoch(3))
    assert not torch.equal(epoch(2), epoch(2, seed=8))


def test_drop_last_and_test_batches():
    images, labels = _images(n=10)
    assert len(DeviceBatches(images, labels, 4, "cpu", drop_last=True)) == 2
    test = DeviceBatches(images, labels, 4, "cpu")
    assert len(test) == 3 and [len(y) for _, y in test] == [4, 4, 2]


def test_subsets_resolve_to_their_images_and_other_sets_are_refused():
    images, labels = _images(n=10)
    dataset = Subset(Subset(TensorImageDataset(images, labels), [9, 1, 4, 7]), [3, 0])
    got_images, got_labels = in_memory_tensors(dataset)
    assert got_labels.tolist() == [21, 27] and torch.equal(got_images, images[[7, 9]])
    with pytest.raises(ValueError, match="data.on_device"):
        in_memory_tensors(torch.utils.data.TensorDataset(images))
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(images.float(), labels, 4, "cpu")
