import numpy as np
import pytest
import torch

from hypernorm.config import load_config
from hypernorm.data import build_dataset, build_datasets, cifar_train_transform, load_cifar
from tests.data.cifar_fixture import patch_checksums, write_npz, write_official


def data_section(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.download=false", *overrides])["data"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_pickle_format_loads(tmp_path, monkeypatch, name):
    written = write_official(tmp_path, name, n_train=20, n_test=10)
    patch_checksums(monkeypatch, name, written)
    images, labels, classes, source = load_cifar(name, tmp_path, train=True)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    # CHW tensors of the HWC images that were written, in the batches' order
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(written["x_train"]))
    assert labels.tolist() == written["y_train"].tolist()
    assert len(classes) == (10 if name == "cifar10" else 100) and "official archive" in source
    test_images, test_labels, _, _ = load_cifar(name, tmp_path, train=False)
    assert torch.equal(test_images.permute(0, 2, 3, 1), torch.from_numpy(written["x_test"]))


def test_corrupt_batch_is_a_clear_error(tmp_path, monkeypatch):
    written = write_official(tmp_path, "cifar10", n_train=20, n_test=10)
    patch_checksums(monkeypatch, "cifar10", written)
    batch = written["folder"] / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-100])  # truncated, as by an interrupted copy
    with pytest.raises(ValueError, match=r"corrupt.*data_batch_3.*md5"):
        load_cifar("cifar10", tmp_path, train=True)


def test_missing_official_archive_names_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar("cifar100", tmp_path, train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message and "cifar-100-python.tar.gz" in message
    assert "data.download=true" in message


def test_missing_cifar100_next_to_a_cifar10_npz_says_so(tmp_path):
    write_npz(tmp_path, "cifar10", n_train=10, n_test=10)
    with pytest.raises(FileNotFoundError, match=r"cifar10\.npz.*data\.dataset"):
        build_dataset(data_section(tmp_path), train=True)  # default data.dataset is cifar100


def test_npz_loads_and_subset_is_random_not_a_prefix(tmp_path):
    arrays = write_npz(tmp_path, "cifar10", n_train=60, n_test=20, sort=True)
    train, test, info = build_datasets(data_section(tmp_path, "data.dataset=cifar10", "data.train_subset=20"))
    assert info.name == "cifar10" and info.num_classes == 10 and "cifar10.npz" in info.source
    assert len(train) == 20 and len(test) == 20
    labels = {train[i][1] for i in range(len(train))}
    assert len(labels) > 3  # a prefix of the class-sorted file would hold only classes 0 and 1
    image, label = test[5]
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(arrays["x_test"][5])) and label == arrays["y_test"][5]
    # the subset does not depend on the training seed
    again, _, _ = build_datasets(data_section(tmp_path, "data.dataset=cifar10", "data.train_subset=20"))
    assert again.indices == train.indices


def test_data_root_from_environment(tmp_path, monkeypatch):
    write_npz(tmp_path, "cifar10", n_train=10, n_test=10)
    monkeypatch.setenv("HYPERNORM_DATA", str(tmp_path))
    data = load_config(None, ["data.dataset=cifar10"])["data"]
    assert data["root"] is None
    _, info = build_dataset(data, train=False)
    assert str(tmp_path) in info.source


def test_corrupt_npz_is_a_clear_error(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match="corrupt or not a numpy .npz"):
        load_cifar("cifar10", tmp_path, train=True)
    np.savez(tmp_path / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="lacks the arrays y_train"):
        load_cifar("cifar10", tmp_path, train=True)
    (tmp_path / "cifar10.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or not a numpy .npz"):
        load_cifar("cifar10", tmp_path, train=True)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "cifar10.npz")
    with pytest.raises(ValueError, match=r"not a numpy .npz archive \(it holds a single array\)"):
        load_cifar("cifar10", tmp_path, train=True)


def test_train_subset_larger_than_the_train_set_is_refused(tmp_path):
    write_npz(tmp_path, n_train=30)
    data = dict(data_section(tmp_path), dataset="cifar10", train_subset=31)
    with pytest.raises(ValueError, match="data.train_subset=31 exceeds the 30 training images of cifar10"):
        build_dataset(data, train=True)


@pytest.mark.parametrize("edit, message", [
    # float labels were truncated to classes (3.7 -> 3) without a word
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32) + 0.5), "y_train must be N integer class labels"),
    (lambda a: a.update(y_train=np.stack([a["y_train"]] * 2, 1)), "y_train must be N integer class labels"),
    (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "x_test holds no images"),
    (lambda a: a.update(x_train=a["x_train"].transpose(0, 3, 1, 2)), r"x_train must be uint8 \(N, 32, 32, 3\)"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), r"x_train must be uint8 .* got float32"),
    (lambda a: a.update(y_train=a["y_train"][:10]), "x_train must be uint8 .* and 10 labels"),
    (lambda a: a.update(y_train=a["y_train"] + 5), r"y_train labels must lie in 0..9 for CIFAR-10"),
])
def test_npz_labels_and_empty_splits_are_clear_errors(tmp_path, edit, message):
    arrays = write_npz(tmp_path)
    edit(arrays)
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_cifar("cifar10", tmp_path, train="train" in message)


def test_npz_of_another_data_set_is_refused(tmp_path):
    arrays = write_npz(tmp_path)  # CIFAR-10's arrays: their labels 0..9 are valid CIFAR-100 labels too
    (tmp_path / "cifar10.npz").rename(tmp_path / "cifar100.npz")
    with pytest.raises(ValueError, match="cifar100.npz: class_names lists 10 classes, but CIFAR-100 has 100"):
        load_cifar("cifar100", tmp_path, train=True)
    assert len(arrays["class_names"]) == 10


def test_npz_label_column_is_read_as_labels(tmp_path):
    arrays = write_npz(tmp_path)
    np.savez(tmp_path / "cifar10.npz", **dict(arrays, y_train=arrays["y_train"][:, None]))  # (N, 1), as some copies
    _, labels, _, _ = load_cifar("cifar10", tmp_path, train=True)
    assert labels.tolist() == arrays["y_train"].tolist()


def test_train_transform_is_padded_crop_and_flip_on_uint8():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    transform = cifar_train_transform()
    for _ in range(5):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        windows = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


def test_unknown_dataset_in_config_is_rejected():
    with pytest.raises(ValueError, match="cifar100, cifar10, imagenet"):
        load_config(None, ["data.dataset=mnist"])
