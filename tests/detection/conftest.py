"""A tiny COCO-format data set written by the tests themselves: a few images with boxes of known classes."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

# category id -> colour of its filled rectangles; the ids are non-contiguous as in COCO.
COLOURS = {1: (230, 40, 40), 3: (40, 60, 230)}
# image id -> (width, height, [(category id, [x, y, w, h]), ...]); image 4 has no objects.
IMAGES = {
    1: (80, 64, [(1, [8, 10, 30, 24]), (3, [44, 30, 28, 26])]),
    2: (64, 64, [(3, [4, 4, 24, 40]), (1, [34, 36, 22, 20])]),
    3: (72, 56, [(1, [20, 12, 36, 30])]),
    4: (64, 48, []),
}


def write_tiny_coco(root) -> tuple[str, str]:
    """Write images/*.png and annotations.json under ``root``; returns (image folder, annotation file)."""
    gen = torch.Generator().manual_seed(0)
    image_dir = root / "images"
    image_dir.mkdir()
    images, annotations = [], []
    for image_id, (width, height, objects) in IMAGES.items():
        image = torch.randint(90, 150, (3, height, width), generator=gen, dtype=torch.uint8)
        for category, (x, y, w, h) in objects:
            image[:, y:y + h, x:x + w] = torch.tensor(COLOURS[category], dtype=torch.uint8)[:, None, None]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(image_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": width, "height": height})
    # A crowd region: dropped from the training targets, ignored by COCOeval.
    annotations.append({"id": len(annotations) + 1, "image_id": 3, "category_id": 3, "bbox": [0, 40, 60, 14],
                        "area": 840, "iscrowd": 1})
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "red box"}, {"id": 3, "name": "blue box"}],
    }))
    return str(image_dir), str(ann_file)



@pytest.fixture
def tiny_coco(tmp_path):
    return write_tiny_coco(tmp_path)


def tiny_config_overrides(image_dir: str, ann_file: str, output: str) -> list[str]:
    """key=value overrides for a few CPU iterations at 64 px with few RoIs."""
    return [
        "model.arch=resnet18", "model.min_size=64", "model.max_size=96",
        "model.kwargs={rpn_pre_nms_top_n_train: 64, rpn_post_nms_top_n_train: 16, rpn_pre_nms_top_n_test: 64, "
        "rpn_post_nms_top_n_test: 16, rpn_batch_size_per_image: 32, box_batch_size_per_image: 8, "
        "box_score_thresh: 0.0}",
        f"data.train_images={image_dir}", f"data.train_ann={ann_file}",
        f"data.val_images={image_dir}", f"data.val_ann={ann_file}", "data.workers=0",
        "train.epochs=1", "train.batch_size=2", "optim.lr=0.01", "optim.lr_batch=2", "optim.warmup_iters=2",
        "optim.milestones=[]", "train.max_iters=2", "train.device=cpu", "train.threads=1", f"output.dir={output}",
    ]
