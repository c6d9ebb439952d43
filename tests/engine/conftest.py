import pytest

from tests.data.cifar_fixture import patch_checksums, write_official


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A 64/32-image CIFAR-10 in the official pickle layout, md5s patched into torchvision."""
    root = tmp_path / "data"
    patch_checksums(monkeypatch, "cifar10", write_official(root, "cifar10", n_train=64, n_test=32))
    return root

