"""ShuffleNetV2 1x (Ma et al. 2018) of the paper's Table 3, from torchvision's builder."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torchvision.models import shufflenetv2 as tv_shufflenet

from .registry import register_model

__all__ = ["shufflenet_v2_x1_0", "replace_batchnorm"]

NormLayer = Callable[[int], nn.Module]


def replace_batchnorm(model: nn.Module, norm_layer: NormLayer) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``model`` for ``norm_layer(num_features)``, in place: for builders
    that, like torchvision's ShuffleNetV2, take no ``norm_layer`` argument."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, norm_layer(module.num_features))
    return model


def _is_downsampling_unit(block: nn.Module) -> bool:
    return getattr(block, "stride", 1) != 1


# A stage's first unit halves the resolution and has an extra branch whose first norm sees the stage's
# input (24 channels in stage 2, not the stage's 58). The down-sampling units keep their norms: Table 3's
# 2.455M parameters count one HyperNorm per stride-1 unit (3 + 7 + 3), sharing its stage's LSTM.
@register_model("shufflenet_v2_x1_0", input_size=224, num_classes=1000, skip=_is_downsampling_unit)
def shufflenet_v2_x1_0(norm_layer: NormLayer, num_classes: int = 1000, **kwargs: Any) -> tv_shufflenet.ShuffleNetV2:
    return replace_batchnorm(tv_shufflenet.shufflenet_v2_x1_0(num_classes=num_classes, **kwargs), norm_layer)
