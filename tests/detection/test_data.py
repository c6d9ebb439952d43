import json

import pytest
import torch

from hypernorm.detection.data import CocoDetection, collate, detection_transforms, load_coco

from .conftest import IMAGES


def test_dataset_items_are_torchvision_targets(tiny_coco):
    dataset = CocoDetection(*tiny_coco, detection_transforms(train=False))
    assert len(dataset) == 4 and dataset.num_classes == 4  # ids 1 and 3 kept as they are, + background
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 80) and 0 <= image.min() and image.max() <= 1
    assert target["image_id"] == 1
    assert target["boxes"].tolist() == [[8, 10, 38, 34], [44, 30, 72, 56]]  # xywh -> x1y1x2y2
    assert target["labels"].tolist() == [1, 3]
    _, target = dataset[2]
    assert target["labels"].tolist() == [1]  # the crowd region is not a training box
    _, target = dataset[3]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_horizontal_flip_moves_boxes_with_the_image(tiny_coco):
    plain = CocoDetection(*tiny_coco, detection_transforms(train=False))
    flipped = CocoDetection(*tiny_coco, detection_transforms(train=True, hflip=1.0))
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    assert torch.equal(image_f, image.flip(-1))
    width = IMAGES[1][0]
    expected = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    assert torch.allclose(target_f["boxes"], expected)
    images, targets = collate([flipped[0], flipped[1]])
    assert type(images[0]) is torch.Tensor and type(targets[0]["boxes"]) is torch.Tensor


def _broken(tmp_path, tiny_coco, edit):
    data = json.loads(open(tiny_coco[1]).read())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), r"'annotations' is missing"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\] \(id 2\) has bbox \[1, 2, 3\]"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"width, height >= 0"),
    (lambda d: d["annotations"][0].update(category_id=7), r"category_id 7, which is not in 'categories'"),
    (lambda d: d["annotations"][0].update(image_id=99), r"refers to image 99"),
    (lambda d: d["annotations"][2].pop("image_id"), r"annotations\[2\] has no 'image_id'"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] needs id, file_name"),
    (lambda d: d["categories"].append({"id": 0, "name": "bg"}), r"integer id >= 1"),
])
def test_malformed_annotation_file_gives_clear_error(tmp_path, tiny_coco, edit, message):
    path = _broken(tmp_path, tiny_coco, edit)
    with pytest.raises(ValueError, match=f"malformed COCO annotation file .*broken.json: .*{message}"):
        CocoDetection(tiny_coco[0], path)


def test_unreadable_or_missing_files(tmp_path, tiny_coco):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(bad)
    with pytest.raises(FileNotFoundError, match="nothere.json does not exist"):
        load_coco(tmp_path / "nothere.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetection(tmp_path / "noimages", tiny_coco[1])
    (tmp_path / "images" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of .* are not in .*e.g. 000002.png"):
        CocoDetection(*tiny_coco)


def test_truncated_image_names_the_file(tiny_coco):
    image_dir, ann_file = tiny_coco
    path = f"{image_dir}/000001.png"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])
    dataset = CocoDetection(image_dir, ann_file)
    with pytest.raises(ValueError, match=r"image .*000001.png cannot be read \(.*\); replace it"):
        dataset[dataset.ids.index(1)]
