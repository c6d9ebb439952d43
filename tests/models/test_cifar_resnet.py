import pytest
import torch

from hypernorm import create_model, list_models
from hypernorm.nn import HyperNorm


@pytest.mark.parametrize("name, params", [("resnet20", 278_324), ("resnet56", 861_620), ("resnet164", 1_726_388)])
def test_cifar_resnet_sizes(name, params):
    # ResNet-164 with a CIFAR-100 head: 1.73M, the size reported by He et al. (2016b)
    assert sum(p.numel() for p in create_model(name, "bn").parameters()) == params


def test_preact_resnet164_puts_bhn_on_the_stage_width_norm():
    model = create_model("resnet164", "bhn")
    assert all(isinstance(block.bn2, HyperNorm) for block in model.layer3)
    assert model.layer3[0].bn2.num_features == 64


@pytest.mark.parametrize("norm", ["bn", "bhn", "gn", "ghn"])
def test_resnet20_forward_backward(norm):
    model = create_model("resnet20", norm, num_classes=10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*resnet20"):
        create_model("resnet999")
    with pytest.raises(ValueError, match="valid norms: .*bhn"):
        create_model("resnet20", "xx")
    assert {"resnet20", "resnet56", "resnet164"} <= set(list_models())
