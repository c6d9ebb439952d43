"""CIFAR ResNeXt-29 (Xie et al. 2017, Sec. 5.3) of the paper's Table 1: a 3x3 stem of 64 channels, three
stages of three torchvision Bottleneck blocks with outputs 256/512/1024, ``cardinality`` groups of width
``base_width`` (64 in "8x64d") in the first stage, doubled at each stage."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1, conv3x3

from .registry import register_model

__all__ = ["CifarResNeXt", "resnext29_8x64d", "resnext29_16x64d"]

NormLayer = Callable[[int], nn.Module]


class CifarResNeXt(nn.Module):
    def __init__(self, cardinality: int, base_width: int, norm_layer: NormLayer, num_classes: int = 100,
                 blocks_per_stage: int = 3, stem_width: int = 64) -> None:
        super().__init__()
        if cardinality < 1 or base_width < 1:
            raise ValueError(f"CifarResNeXt needs cardinality >= 1 and base_width >= 1, "
                             f"got {cardinality} and {base_width}")
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        in_ch = stem_width
        for i, planes in enumerate((64, 128, 256)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                downsample = None
                if stride != 1 or in_ch != planes * Bottleneck.expansion:
                    downsample = nn.Sequential(conv1x1(in_ch, planes * Bottleneck.expansion, stride),
                                               norm_layer(planes * Bottleneck.expansion))
                # Bottleneck's width = planes * base_width / 64 * groups: 8x64d -> 512, 1024, 2048.
                blocks.append(Bottleneck(in_ch, planes, stride, downsample, groups=cardinality,
                                         base_width=base_width, norm_layer=norm_layer))
                in_ch = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# HyperNorm goes on each block's last norm (bn3, the block's output width 256/512/1024), the narrowest norm
# of a ResNeXt block, as bn1 is in ResNet-50's: on the grouped width (512..4096 channels) each stage's LSTM
# (2.5 C^2 parameters) would add 13.8M parameters to 8x64d and 55M to 16x64d instead of 3.4M.
@register_model("resnext29_8x64d", input_size=32, num_classes=100, norm_index="bn3")
def resnext29_8x64d(norm_layer: NormLayer, num_classes: int = 100) -> CifarResNeXt:
    return CifarResNeXt(8, 64, norm_layer, num_classes)


@register_model("resnext29_16x64d", input_size=32, num_classes=100, norm_index="bn3")
def resnext29_16x64d(norm_layer: NormLayer, num_classes: int = 100) -> CifarResNeXt:
    return CifarResNeXt(16, 64, norm_layer, num_classes)
