"""COCO bounding-box evaluation (pycocotools COCOeval) and the Table 2 layout."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

__all__ = ["METRICS", "predict", "to_coco_results", "coco_evaluate", "evaluate", "format_table"]

# COCOeval.stats[0:6], in the column order of Table 2.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[int, dict[str, torch.Tensor]]:
    """image_id -> the model's detections (boxes x1y1x2y2 in original pixels, scores, labels), on the CPU."""
    model.eval()
    predictions: dict[int, dict[str, torch.Tensor]] = {}
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for target, output in zip(targets, outputs):
            predictions[int(target["image_id"])] = {k: v.detach().cpu() for k, v in output.items()}
    return predictions


def to_coco_results(predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Detections in the COCO results format: ``image_id, category_id, bbox [x, y, w, h], score``."""
    results = []
    for image_id, output in predictions.items():
        boxes = output["boxes"].clone().float()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return results


def coco_evaluate(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Iterable[int] | None = None,
                  verbose: bool = False) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (fractions; -1 where COCO has no ground truth of that size).

    ``image_ids`` restricts the evaluation to the images that were predicted (all of ``coco_gt`` by default).
    """
    if not results:  # loadRes cannot take an empty list; no detections means zero precision
        return {name: 0.0 for name in METRICS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if verbose:
        print(out.getvalue().rsplit("DONE", 1)[-1].split("\n", 1)[-1].strip())  # the standard 12-line summary
    return {name: float(value) for name, value in zip(METRICS, coco_eval.stats[:6])}


def evaluate(model: nn.Module, loader: Iterable, coco_gt: COCO, device: torch.device | str = "cpu",
             verbose: bool = False) -> dict[str, float]:
    """Predict on ``loader`` (each rank its shard under DDP) and score every predicted image with COCOeval.

    Under DDP every rank returns the same metrics. A DistributedSampler's padding repeats images; keying the
    predictions by image id counts each image once.
    """
    predictions = predict(model, loader, device)
    if dist.is_available() and dist.is_initialized():
        shards: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, predictions)
        predictions = {k: v for shard in shards for k, v in shard.items()}
    return coco_evaluate(coco_gt, to_coco_results(predictions), predictions.keys(), verbose)


def format_table(rows: Iterable[tuple[str, str, Mapping[str, float]]]) -> str:
    """Rows ``(backbone norm, neck/head norm, metrics)`` as Table 2: AP in percent, one decimal."""
    names = {"none": "-", "frozenbn": "FrozenBN"}
    lines = [f"{'Backbone':<10} {'Neck/Head':<10} " + " ".join(f"{m:>5}" for m in METRICS)]
    for backbone, neck, metrics in rows:
        cells = " ".join(f"{100 * metrics[m]:5.1f}" if metrics[m] >= 0 else f"{'-':>5}" for m in METRICS)
        label = [names.get(n, n.upper().replace("SYNC", "Sync")) for n in (backbone, neck)]
        lines.append(f"{label[0]:<10} {label[1]:<10} {cells}")
    return "\n".join(lines)
