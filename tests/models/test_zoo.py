import pytest
import torch
from torch import nn

from hypernorm import create_model, list_models
from hypernorm.models import model_info
from hypernorm.models.resnet import SEBottleneck
from hypernorm.nn import HyperNorm, SwitchableNorm2d, is_norm

NORMS = ["bn", "bhn", "syncbn", "syncbhn", "gn", "ghn", "sn", "shn"]
NORM_TYPES = {"bn": nn.BatchNorm2d, "syncbn": nn.SyncBatchNorm, "gn": nn.GroupNorm, "sn": SwitchableNorm2d}
PAPER_MODELS = ["resnet164", "resnext29_8x64d", "resnext29_16x64d",  # Table 1 (CIFAR-100)
                "resnet18", "resnet50", "resnet101", "seresnet50", "shufflenet_v2_x1_0"]  # Table 3 (ImageNet)



def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, norm, **kwargs):
    with torch.device("meta"):  # structure and sizes only, nothing allocated or initialized
        return create_model(name, norm, **kwargs)


def test_list_models_covers_the_paper():
    assert set(PAPER_MODELS) | {"resnet20", "resnet56"} <= set(list_models())


@pytest.mark.parametrize("name", sorted(set(PAPER_MODELS) | {"resnet20", "resnet56"}))
@pytest.mark.parametrize("norm", NORMS)
def test_every_model_in_every_norm_is_built_as_asked(name, norm):
    """Every norm layer has the requested type; a HyperNorm variant has one HN per (non-skipped) block,
    one LSTM per stage counted once, and drops exactly the replaced norms' affine parameters."""
    base = norm.replace("hn", "n")
    model = meta_model(name, norm, num_classes=7)
    assert model.fc.out_features == 7
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(type(m) is NORM_TYPES[base] for m in norms)
    hns = [m for m in model.modules() if isinstance(m, HyperNorm)]
    if norm == base:
        assert not hns
        return
    skip = model_info(name).convert_options.get("skip") or (lambda block: False)
    stages = [m for m in model.children()
              if isinstance(m, nn.Sequential) and any(isinstance(x, HyperNorm) for x in m.modules())]
    assert len(hns) == sum(1 for stage in stages for block in stage if not skip(block))
    relays = {id(hn.relay): hn.relay for hn in hns}
    assert len(relays) == len(stages)
    plain = meta_model(name, base, num_classes=7)
    dropped = sum(2 * hn.num_features for hn in hns)  # gamma and beta of each replaced norm
    assert n_params(model) == n_params(plain) - dropped + sum(n_params(r) for r in relays.values())


# Small inputs: the ImageNet networks reduce by 32, the CIFAR ones by 4.
SMALL_INPUT = {"resnext29_8x64d": 4, "resnext29_16x64d": 4, "resnet20": 8, "resnet56": 8, "resnet164": 8,
               "resnet18": 32, "resnet50": 32, "resnet101": 32, "seresnet50": 32, "shufflenet_v2_x1_0": 32}


def _forward_backward(name, norm, size):
    model = create_model(name, norm, num_classes=5)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    lstm = [p for m in model.modules() if isinstance(m, HyperNorm) for p in m.relay.parameters()]
    # (a narrow gate map can have all its ReLUs off for a given weight tensor; the LSTM as a whole learns)
    assert bool(lstm) == norm.endswith("hn") and (not lstm or sum(p.grad.abs().sum() for p in lstm) > 0)


@pytest.mark.parametrize("name", sorted(SMALL_INPUT))
def test_every_model_trains_a_step_with_bhn(name):
    _forward_backward(name, "bhn", SMALL_INPUT[name])


@pytest.mark.parametrize("name", ["resnet20", "shufflenet_v2_x1_0"])
@pytest.mark.parametrize("norm", [n for n in NORMS if n != "bhn"])
def test_every_norm_trains_a_step(name, norm):
    _forward_backward(name, norm, SMALL_INPUT[name])


@pytest.mark.parametrize("name, bn, bhn", [
    ("resnet18", 11_689_512, 12_564_232),
    ("resnet50", 25_557_032, 26_428_040),
    ("resnet101", 44_549_160, 45_411_464),
    ("seresnet50", 28_088_024, 28_959_032),
    ("shufflenet_v2_x1_0", 2_278_604, 2_455_010),
])
def test_imagenet_parameter_counts(name, bn, bhn):
    # Table 3: 11.690M/12.564M, 25.557M/26.428M, 44.549M/45.411M, 28.088M/28.959M, 2.278M/2.455M
    assert n_params(meta_model(name, "bn")) == bn
    assert n_params(meta_model(name, "bhn")) == bhn


@pytest.mark.parametrize("name, classes, params", [
    ("resnext29_8x64d", 10, 34_426_698), ("resnext29_8x64d", 100, 34_518_948),
    ("resnext29_16x64d", 10, 68_155_210), ("resnext29_16x64d", 100, 68_247_460),
])
def test_resnext29_sizes(name, classes, params):
    # Xie et al. (2017), Table 7: 34.4M and 68.1M, i.e. the CIFAR-10 head (68.155M printed as 68.1M)
    assert n_params(meta_model(name, "bn", num_classes=classes)) == params


def test_resnext29_shape():
    model = meta_model("resnext29_16x64d", "bhn")
    assert [model.layer1[0].conv2.groups, model.layer1[0].conv2.in_channels] == [16, 1024]
    assert model.layer3[2].conv3.out_channels == 1024 and model.layer3[0].conv2.stride == (2, 2)
    assert all(isinstance(block.bn3, HyperNorm) for block in model.layer2)  # the block's narrowest norm


def test_seresnet50_excites_the_residual_branch():
    model = meta_model("seresnet50", "bn")
    block = model.layer3[0]
    assert isinstance(block, SEBottleneck)
    assert (block.se.fc1.in_channels, block.se.fc1.out_channels) == (1024, 64)
    # the excitation scales the residual branch, not the sum: with the branch's last norm at zero the
    # block is relu(shortcut) whatever the SE does
    block = create_model("seresnet50", "bn").layer1[1].eval()
    torch.nn.init.zeros_(block.bn3.weight)
    x = torch.randn(2, 256, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_shufflenet_norm_replacement_and_skipped_downsampling_units():
    model = meta_model("shufflenet_v2_x1_0", "ghn")
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert isinstance(model.stage2[1].branch2[1], HyperNorm)
    assert isinstance(model.stage2[0].branch2[1], nn.GroupNorm)  # the down-sampling unit keeps its norms


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*seresnet50.*shufflenet_v2_x1_0"):
        create_model("seresnet51")
    with pytest.raises(ValueError, match="valid norms: .*shn.*syncbhn"):
        create_model("resnet50", "xhn")
