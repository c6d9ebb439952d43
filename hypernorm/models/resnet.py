"""ImageNet ResNets of the paper's Table 3, from torchvision's builders: ResNet-18/50/101 (He et al. 2016)
and SE-ResNet-50 (Hu et al. 2018), i.e. torchvision's Bottleneck with a squeeze-and-excitation module."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import SqueezeExcitation

from .registry import register_model

__all__ = ["SEBottleneck", "resnet18", "resnet50", "resnet101", "seresnet50"]

NormLayer = Callable[[int], nn.Module]


@register_model("resnet18", input_size=224, num_classes=1000)
def resnet18(norm_layer: NormLayer, num_classes: int = 1000, **kwargs: Any) -> tv_resnet.ResNet:
    return tv_resnet.resnet18(norm_layer=norm_layer, num_classes=num_classes, **kwargs)


@register_model("resnet50", input_size=224, num_classes=1000)
def resnet50(norm_layer: NormLayer, num_classes: int = 1000, **kwargs: Any) -> tv_resnet.ResNet:
    return tv_resnet.resnet50(norm_layer=norm_layer, num_classes=num_classes, **kwargs)


@register_model("resnet101", input_size=224, num_classes=1000)
def resnet101(norm_layer: NormLayer, num_classes: int = 1000, **kwargs: Any) -> tv_resnet.ResNet:
    return tv_resnet.resnet101(norm_layer=norm_layer, num_classes=num_classes, **kwargs)


class SEBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with squeeze-and-excitation on the residual branch before the addition
    (Hu et al. 2018, Fig. 3), reduction 16: 28.088M parameters for SE-ResNet-50, as in Table 3."""

    reduction = 16

    def __init__(self, inplanes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        channels = planes * self.expansion
        self.se = SqueezeExcitation(channels, channels // self.reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


@register_model("seresnet50", input_size=224, num_classes=1000)
def seresnet50(norm_layer: NormLayer, num_classes: int = 1000, **kwargs: Any) -> tv_resnet.ResNet:
    return tv_resnet.ResNet(SEBottleneck, [3, 4, 6, 3], norm_layer=norm_layer, num_classes=num_classes, **kwargs)
