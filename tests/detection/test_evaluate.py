import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hypernorm.detection.data import CocoDetection, collate, detection_transforms
from hypernorm.detection.evaluate import METRICS, evaluate, format_table


class GroundTruthDetector(nn.Module):
    """Answers each image with its ground-truth boxes (score 1), optionally shifted or relabelled."""

    def __init__(self, dataset: CocoDetection, shift: float = 0.0, relabel: dict[int, int] | None = None) -> None:
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.shift, self.relabel, self.calls = shift, relabel or {}, 0

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.targets[self.calls]
            self.calls += 1
            assert image.shape[-2:] == target["boxes"].canvas_size  # the loader's order is the dataset's
            boxes = target["boxes"].as_subclass(torch.Tensor) + self.shift
            labels = torch.tensor([self.relabel.get(int(label), int(label)) for label in target["labels"]])
            outputs.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(boxes))})
        return outputs


@pytest.fixture
def val_loader(tiny_coco):
    dataset = CocoDetection(*tiny_coco, detection_transforms(train=False))
    return dataset, DataLoader(dataset, batch_size=2, collate_fn=collate)


def test_ground_truth_as_detections_gets_ap_1(val_loader):
    dataset, loader = val_loader
    metrics = evaluate(GroundTruthDetector(dataset), loader, dataset.coco)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == pytest.approx(1.0)  # fixture boxes are small (< 32^2) and medium
    assert metrics["APl"] == -1.0  # COCO's marker: no large ground truth to score


def test_wrong_detections_score_lower(val_loader):
    dataset, loader = val_loader
    # Shifting every box by 3 px puts its IoU with the ground truth between 0.58 and 0.70.
    shifted = evaluate(GroundTruthDetector(dataset, shift=3.0), loader, dataset.coco)
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP75"] == 0.0 and 0.0 < shifted["AP"] < 0.5
    swapped = evaluate(GroundTruthDetector(dataset, relabel={1: 3, 3: 1}), loader, dataset.coco)
    assert swapped["AP"] == 0.0


def test_no_detections_is_zero_ap(val_loader):
    dataset, loader = val_loader

    class Nothing(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                     "scores": torch.zeros(0)} for _ in images]

    assert evaluate(Nothing(), loader, dataset.coco) == {name: 0.0 for name in METRICS}


def test_table_layout():
    metrics = dict(zip(METRICS, [0.387, 0.591, 0.42, 0.225, 0.413, -1.0]))
    lines = format_table([("bhn", "bhn", metrics), ("frozenbn", "none", metrics)]).splitlines()
    assert lines[0].split() == ["Backbone", "Neck/Head", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[1].split() == ["BHN", "BHN", "38.7", "59.1", "42.0", "22.5", "41.3", "-"]
    assert lines[2].split()[:2] == ["FrozenBN", "-"]
