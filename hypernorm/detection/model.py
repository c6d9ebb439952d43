"""Faster R-CNN with a ResNet-FPN backbone whose backbone and neck/head norms are chosen by name (Table 2).

Everything is torchvision's: ``resnet50`` -> ``BackboneWithFPN`` (FPN with ``norm_layer``) -> ``FasterRCNN``
with either the standard two-FC box head (no neck/head norm) or ``FastRCNNConvFCHead`` (4 conv + 1 FC, each
conv normalized), as in Wu & He's GN detection setup. HyperNorm's relay stages are:

* backbone: :func:`hypernorm.convert` on the ResNet body, one HN per bottleneck (its first norm), one LSTM
  relayed per stage ``layer1``..``layer4`` (the classification layout of Table 3);
* neck: one HN per pyramid level, on the norm of the level's 3x3 output conv; the four levels are one relay
  stage in the order the FPN runs them, top-down P5 -> P4 -> P3 -> P2 (the 1x1 laterals keep the base norm);
* head: the four 3x3 convs of the box head are one relay stage (one HN each), run per RoI.

The RPN head keeps no norm in every variant (as in torchvision's and Detectron's GN/SyncBN configurations).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # what fasterrcnn_resnet50_fpn uses
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FrozenBatchNorm2d

from ..nn import HyperNorm, convert, get_norm_layer, norm_names, share_relay, split_norm_name

__all__ = [
    "create_detector",
    "backbone_norm_names",
    "neck_norm_names",
    "detector_parameter_counts",
    "TABLE2_PAIRS",
]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
FPN_CHANNELS = 256

# (backbone norm, neck/head norm) for each row of the paper's Table 2, in its order (the two "sn" rows are
# cited from the SwitchableNorm paper there; here they are built with hypernorm.nn.SwitchableNorm2d). The "BN"
# backbone of the top two blocks is the standard frozen BN (36.4 AP is the usual 1x baseline); the bottom block
# trains BN in both (its 32.9 AP is the micro-batch effect). docs/detection.md.
TABLE2_PAIRS: tuple[tuple[str, str], ...] = (
    ("frozenbn", "none"), ("syncbn", "none"), ("gn", "none"), ("bhn", "none"),
    ("frozenbn", "bn"), ("frozenbn", "syncbn"), ("frozenbn", "gn"), ("frozenbn", "sn"), ("frozenbn", "bhn"),
    ("bn", "bn"), ("syncbn", "syncbn"), ("gn", "gn"), ("sn", "sn"), ("bhn", "bhn"),
)


def backbone_norm_names() -> list[str]:
    """"frozenbn" (torchvision's default for fine-tuning) and every registered norm ("bn", "gn", "bhn", ...)."""
    return ["frozenbn"] + norm_names()


def neck_norm_names() -> list[str]:
    """"none" (plain FPN, two-FC box head) and every registered norm."""
    return ["none"] + norm_names()


def _backbone_norm_layer(name: str) -> tuple[Callable[..., nn.Module], bool]:
    """The norm to build the ResNet with, and whether to convert it to HyperNorm afterwards."""
    if name == "frozenbn":
        return FrozenBatchNorm2d, False
    if name not in norm_names():
        raise ValueError(f"unknown backbone_norm {name!r}; valid: {', '.join(backbone_norm_names())}")
    base, hyper = split_norm_name(name)
    return get_norm_layer(base), hyper


def _load_backbone_weights(body: nn.Module, weights: str | os.PathLike) -> None:
    """A checkpoint of a classification ResNet of the same norm (for example a BHN or GN ResNet-50)."""
    from ..engine.checkpoint import load_weights, read_checkpoint

    _, state = read_checkpoint(weights)  # weights_only, and a one-line error for a corrupt file
    for key in ("model", "state_dict"):  # engine checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = load_weights(body, state, weights, "this backbone", strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is not part of the detector
    if missing or unexpected:
        raise ValueError(f"weights_backbone {str(weights)!r} does not fit this backbone: missing keys "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. It must be a state_dict of a "
                         "classification ResNet of the same depth and backbone_norm.")


def _build_body(arch: str, backbone_norm: str, weights_backbone: Any, reduction: int) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    norm_layer, hyper = _backbone_norm_layer(backbone_norm)
    local_file = isinstance(weights_backbone, (str, os.PathLike)) and (
        os.path.exists(weights_backbone) or str(weights_backbone).endswith((".pth", ".pt")))
    torchvision_weights = None if local_file else weights_backbone
    bn_type = backbone_norm == "frozenbn" or split_norm_name(backbone_norm)[0] in ("bn", "syncbn")
    if torchvision_weights is not None and not bn_type:
        raise ValueError(f"torchvision's ImageNet weights are BN weights and cannot initialize a "
                         f"{backbone_norm!r} backbone; pass the path of a {backbone_norm} ResNet checkpoint instead")
    # The ImageNet weights load into the BN layers; convert() then keeps their statistics in the BHN standardizers.
    body = getattr(torchvision.models, arch)(weights=torchvision_weights, norm_layer=norm_layer)
    if hyper:
        convert(body, backbone_norm, stages=["layer1", "layer2", "layer3", "layer4"], reduction=reduction)
    if local_file:
        if not os.path.exists(weights_backbone):
            raise FileNotFoundError(f"weights_backbone {str(weights_backbone)!r} does not exist")
        _load_backbone_weights(body, weights_backbone)
    return body


def _hyper_stage(convs: Sequence[tuple[int, nn.Sequential]], norm: str, reduction: int, prefix: str) -> None:
    """Put a HyperNorm on each ``(index, Conv2dNormActivation)`` of ``convs`` (in execution order) and relay
    one LSTM through them."""
    base, _ = split_norm_name(norm)
    layers = []
    for i, block in convs:
        layer = HyperNorm(block[0].out_channels, base, reduction, name=f"{prefix}.{i}.1")
        block[1] = layer
        layers.append(layer)
    share_relay(layers)


def create_detector(
    backbone_norm: str = "frozenbn",
    neck_norm: str = "none",
    num_classes: int = 91,
    *,
    arch: str = "resnet50",
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    reduction: int = 4,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN ResNet-FPN with the given backbone and neck/head norms (every pair of the paper's Table 2).

    Args:
        backbone_norm: "frozenbn", "bn", "syncbn", "gn", "sn", "bhn" (or any name of :func:`hypernorm.nn.norm_names`).
        neck_norm: "none", "bn", "syncbn", "gn", "sn", "bhn" (or any registered name) for the FPN and the box head.
        num_classes: including the background; 91 for COCO's official category ids.
        arch: the ResNet depth; ResNet-50 is the paper's, smaller ones are for quick checks.
        weights_backbone: None (random init; nothing is downloaded), torchvision ImageNet weights for a BN-type
            backbone (e.g. ``"IMAGENET1K_V1"``, online only), or the path of a classification checkpoint of a
            ResNet with the same ``backbone_norm`` (e.g. a BHN ResNet-50 trained with this library).
        trainable_backbone_layers: 0-5 ResNet stages to train, counted from the top; 3 with pretrained
            weights and 5 without, as torchvision.
        kwargs: passed to :class:`torchvision.models.detection.FasterRCNN` (``min_size``, ``max_size``,
            ``box_batch_size_per_image``, ...).
    """
    if neck_norm != "none" and neck_norm not in norm_names():
        raise ValueError(f"unknown neck_norm {neck_norm!r}; valid: {', '.join(neck_norm_names())}")
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if weights_backbone is not None else 5
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}")
    body = _build_body(arch, backbone_norm, weights_backbone, reduction)

    neck_layer = None
    if neck_norm != "none":
        neck_layer = get_norm_layer(split_norm_name(neck_norm)[0])
    backbone = _resnet_fpn_extractor(body, trainable_backbone_layers, norm_layer=neck_layer)

    box_head = None
    if neck_layer is not None:
        # 4conv1fc box head of Wu & He (2018); the norms are what the "neck/head" column of Table 2 varies.
        box_head = FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [FPN_CHANNELS] * 4, [1024], norm_layer=neck_layer)
        if split_norm_name(neck_norm)[1]:
            fpn = backbone.fpn
            top_down = list(reversed(list(enumerate(fpn.layer_blocks))))  # FPN runs P5 first
            _hyper_stage(top_down, neck_norm, reduction, "backbone.fpn.layer_blocks")
            convs = [(i, m) for i, m in enumerate(box_head) if isinstance(m, nn.Sequential)]
            _hyper_stage(convs, neck_norm, reduction, "roi_heads.box_head")
    return FasterRCNN(backbone, num_classes=num_classes, box_head=box_head, **kwargs)


def detector_parameter_counts(model: FasterRCNN) -> dict[str, int]:
    """Parameters of the backbone body, neck (FPN), RPN and box head + predictor, and the total."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    counts = {
        "backbone": count(model.backbone.body),
        "neck": count(model.backbone.fpn),
        "rpn": count(model.rpn),
        "head": count(model.roi_heads),
    }
    counts["total"] = count(model)
    return counts
