"""CIFAR ResNets (32x32 inputs, three stages of widths 16/32/64): ResNet-20/56 (basic blocks, He et al.
2016) and the pre-activation ResNet-164 (bottleneck blocks, He et al. 2016b) of the paper's Table 1."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .registry import register_model

__all__ = ["CifarResNet", "BasicBlock", "PreActBottleneck"]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm + shortcut, relu (the original CIFAR ResNet block)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False), norm_layer(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class PreActBottleneck(nn.Module):
    """norm-relu-conv1x1, norm-relu-conv3x3, norm-relu-conv1x1 (4x width) + shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.bn1 = norm_layer(in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn3 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


class CifarResNet(nn.Module):
    def __init__(self, block: type[nn.Module], depth_per_stage: int, norm_layer: NormLayer,
                 num_classes: int = 100, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.preact = block is PreActBottleneck
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = None if self.preact else norm_layer(widths[0])
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(depth_per_stage):
                blocks.append(block(in_ch, width, 2 if i > 0 and b == 0 else 1, norm_layer))
                in_ch = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = norm_layer(in_ch) if self.preact else None
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.bn_final is not None:
            x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet20", input_size=32, num_classes=100)
def resnet20(norm_layer: NormLayer, num_classes: int = 100) -> CifarResNet:
    return CifarResNet(BasicBlock, 3, norm_layer, num_classes)


@register_model("resnet56", input_size=32, num_classes=100)
def resnet56(norm_layer: NormLayer, num_classes: int = 100) -> CifarResNet:
    return CifarResNet(BasicBlock, 9, norm_layer, num_classes)


# Pre-activation: the first norm of a block sees the (wider) block input; the second has the stage's width.
@register_model("resnet164", input_size=32, num_classes=100, norm_index="bn2")
def resnet164(norm_layer: NormLayer, num_classes: int = 100) -> CifarResNet:
    return CifarResNet(PreActBottleneck, 18, norm_layer, num_classes)
