import pytest
import torch
from PIL import Image

from hypernorm.config import load_config
from hypernorm.data import build_datasets


def write_folder(root, split, classes=("n01", "n02"), per_class=2):
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + 3 * i, 36), (40 * i, 100, 200)).save(root / split / c / f"{i}.png")


def test_imagenet_folders_give_uint8_crops(tmp_path):
    write_folder(tmp_path, "train")
    write_folder(tmp_path, "val")
    data = load_config(None, ["data.dataset=imagenet", f"data.root={tmp_path}", "data.image_size=24"])["data"]
    train, val, info = build_datasets(data)
    assert info.name == "imagenet" and info.num_classes == 2 and len(train) == 4 and len(val) == 4
    image, label = train[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == 1
    assert val[0][0].shape == (3, 24, 24)


def test_missing_imagenet_split_is_a_clear_error(tmp_path):
    write_folder(tmp_path, "train")
    data = load_config(None, ["data.dataset=imagenet", f"data.root={tmp_path}"])["data"]
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found.*ImageFolder"):
        build_datasets(data)
