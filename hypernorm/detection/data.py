"""COCO detection data in the official format, read through pycocotools, with torchvision v2 transforms."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Any, Callable

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["CocoDetection", "load_coco", "detection_transforms", "collate"]


def _fail(ann_file: str, what: str) -> ValueError:
    return ValueError(f"malformed COCO annotation file {ann_file}: {what}. Expected the official format "
                      "(https://cocodataset.org/#format-data): images, annotations and categories lists.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(data: Any, ann_file: str) -> None:
    """Check what the detection pipeline relies on, so a broken file fails here and not deep inside training."""
    if not isinstance(data, dict):
        raise _fail(ann_file, f"the top level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(ann_file, f"{key!r} is missing or not a list")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "width", "height")):
            raise _fail(ann_file, f"images[{i}] needs id, file_name, width and height")
        if image["id"] in image_ids:
            raise _fail(ann_file, f"images[{i}] repeats image id {image['id']}")
        image_ids.add(image["id"])
    category_ids = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or category["id"] < 1:
            raise _fail(ann_file, f"categories[{i}] needs an integer id >= 1 (0 is the background)")
        category_ids.add(category["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(ann_file, f"annotations[{i}] is not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise _fail(ann_file, f"annotations[{i}] has no {key!r}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox) \
                or bbox[2] < 0 or bbox[3] < 0:
            raise _fail(ann_file, f"annotations[{i}] (id {ann['id']}) has bbox {bbox!r}; it must be [x, y, width, "
                                  "height] in pixels with width, height >= 0")
        if ann["image_id"] not in image_ids:
            raise _fail(ann_file, f"annotations[{i}] (id {ann['id']}) refers to image {ann['image_id']}, "
                                  "which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise _fail(ann_file, f"annotations[{i}] (id {ann['id']}) has category_id {ann['category_id']}, "
                                  "which is not in 'categories'")


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """A pycocotools ``COCO`` for ``ann_file``, after checking the file; errors name the problem."""
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file {ann_file} does not exist; set data.*_ann to an "
                                "instances_*.json file")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise _fail(ann_file, f"not valid JSON ({err})") from None
    _validate(data, ann_file)
    for ann in data["annotations"]:  # pycocotools' own defaults, so loadRes/COCOeval see complete records
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def detection_transforms(train: bool, hflip: float = 0.5) -> Callable:
    """The standard Faster R-CNN augmentation: horizontal flip in training; resizing to ``min_size``/``max_size``
    and normalization happen inside the model (torchvision's GeneralizedRCNNTransform)."""
    steps: list[Callable] = []
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class CocoDetection(torch.utils.data.Dataset):
    """Images and non-crowd boxes of a COCO annotation file, as ``(image, target)`` for torchvision's detectors.

    ``target`` holds ``boxes`` (x1, y1, x2, y2 pixels, a ``tv_tensors.BoundingBoxes``), ``labels`` (the official
    category ids, so ``num_classes`` is the largest id + 1, 91 for COCO) and ``image_id``. Crowd regions and
    empty boxes are dropped for training, as in torchvision's detection reference; COCOeval still uses them.
    """

    def __init__(self, image_root: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Callable | None = None, max_images: int | None = None) -> None:
        self.image_root = os.fspath(image_root)
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f"COCO image folder {self.image_root} does not exist")
        self.coco = load_coco(ann_file)
        self.ids = sorted(self.coco.getImgIds())
        if max_images is not None:
            self.ids = self.ids[:max_images]
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not os.path.isfile(os.path.join(self.image_root, self.coco.imgs[i]["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {ann_file} are not in {self.image_root}, "
                                    f"e.g. {missing[0]}")
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return max(self.coco.getCatIds(), default=0) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_root, info["file_name"])
        try:
            with Image.open(path) as pil:
                image = v2.functional.pil_to_tensor(pil.convert("RGB"))
        except OSError as err:  # truncated or not an image: PIL's message does not name the file
            raise ValueError(f"image {path} cannot be read ({err}); replace it or remove it from the annotations") \
                from None
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(f"{path} is {width}x{height} but the annotation file says "
                             f"{info['width']}x{info['height']}")
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "image_id": image_id,
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Lists of images and targets (the detectors take images of different sizes), as plain tensors."""
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    targets = [{k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for _, t in batch]
    return images, targets
