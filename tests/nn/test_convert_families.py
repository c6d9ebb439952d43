"""convert() on today's torchvision and timm families (random weights, small inputs): the stages it finds, and
the guarantees tested for ResNets (train step, eval batch independence, state_dict round trip, compile)."""
import io

import pytest
import torch
import torchvision
from torch import nn

from hypernorm.models.convert_table import compile_check
from hypernorm.models.external import convert_defaults, create_external_model
from hypernorm.nn import HyperNorm, convert, explain

timm = pytest.importorskip("timm")


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class NestedStages(nn.Module):
    """The stages sit in one outer Sequential, each a Sequential of blocks (a common way to write a network)."""

    def __init__(self, widths=(8, 16), blocks=2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        stages, in_ch = [], widths[0]
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(in_ch, w, 3, 2, 1), *[Block(w) for _ in range(blocks)]))
            in_ch = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def small_vit_torchvision(num_classes=10):
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialized: no gradient would pass the head
    return model


def small_vit_timm(num_classes=10):
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3,
                                                            num_heads=2, num_classes=num_classes)


def small_convnext_torchvision(num_classes=10):
    from torchvision.models.convnext import CNBlockConfig
    return torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)], num_classes=num_classes)


def external(name, **kwargs):
    return lambda: create_external_model(name, "bn", 10, **kwargs)


# (builder, convert options, input size, the stages: architectural facts, e.g. ResNet's layer1..4)
FAMILIES = {
    "tv_resnet50": (external("torchvision/resnet50"), {}, 32, ["layer1", "layer2", "layer3", "layer4"]),
    "tv_resnext50": (external("torchvision/resnext50_32x4d"), {}, 32, ["layer1", "layer2", "layer3", "layer4"]),
    # inverted residuals: the projection norm (stage width); a lone block (stage of one) keeps its norms
    "tv_mobilenet_v2": (external("torchvision/mobilenet_v2"), convert_defaults("mobilenet_v2"), 32,
                        ["features[2..3]", "features[4..6]", "features[7..10]", "features[11..13]",
                         "features[14..16]"]),
    "tv_mobilenet_v3_small": (external("torchvision/mobilenet_v3_small"), convert_defaults("mobilenet_v3_small"), 32,
                              ["features[2..3]", "features[4..6]", "features[7..8]", "features[9..11]"]),
    "tv_efficientnet_b0": (external("torchvision/efficientnet_b0"), convert_defaults("efficientnet_b0"), 32,
                           [f"features.{i}" for i in range(2, 7)]),
    "tv_regnet_y_400mf": (external("torchvision/regnet_y_400mf"), {}, 32,
                          ["trunk_output.block2", "trunk_output.block3", "trunk_output.block4"]),
    "tv_convnext_tiny": (external("torchvision/convnext_tiny"), {}, 32, ["features.1", "features.3", "features.5",
                                                                         "features.7"]),
    "tv_densenet121": (external("torchvision/densenet121"), convert_defaults("densenet121"), 32,
                       [f"features.denseblock{i}" for i in range(1, 5)]),
    "tv_vit": (small_vit_torchvision, {}, 16, ["encoder.layers"]),
    "tv_swin_t": (external("torchvision/swin_t"), {}, 32, ["features.1", "features.3", "features.5", "features.7"]),
    # timm zero-initializes each block's last norm, which would zero the first step's gradient behind it
    "timm_resnet50": (external("timm/resnet50", zero_init_last=False), {}, 32, ["layer1", "layer2", "layer3", "layer4"]),
    "timm_efficientnet_b0": (external("timm/efficientnet_b0"), convert_defaults("efficientnet_b0"), 32,
                             [f"blocks.{i}" for i in range(1, 6)]),
    "timm_regnety_002": (external("timm/regnety_002", zero_init_last=False), {}, 32, ["s3", "s4"]),
    "timm_convnext_atto": (external("timm/convnext_atto"), {}, 32, [f"stages.{i}.blocks" for i in range(4)]),
    "timm_vit": (small_vit_timm, {}, 16, ["blocks"]),
    "nested_sequential": (NestedStages, {}, 16, ["stages.0[1..2]", "stages.1[1..2]"]),
}


def _build(family):
    torch.manual_seed(0)
    return FAMILIES[family][0]()


def _converted(family):
    builder, options, size, _ = FAMILIES[family]
    model = _build(family)
    convert(model, "hn", **options)
    return model, size


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stages_found_and_plan_matches_conversion(family):
    _, options, _, stages = FAMILIES[family]
    model = _build(family)
    before = sum(p.numel() for p in model.parameters())
    plan = explain(model, "hn", **options)
    assert [stage.name for stage in plan.stages] == stages
    assert not any(isinstance(m, HyperNorm) for m in model.modules())  # a dry run changes nothing
    convert(model, "hn", **options)
    hns = [m for m in model.modules() if isinstance(m, HyperNorm)]
    assert len(hns) == plan.hn_layers and len({id(hn.relay) for hn in hns}) == len(stages)
    assert sum(p.numel() for p in model.parameters()) == before + plan.params_added


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_eval_independence_and_state_dict(family):
    model, size = _converted(family)
    model.train()
    x = torch.randn(3, 3, size, size)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    lstm = [p for m in model.modules() if isinstance(m, HyperNorm) and m.starts_stage for p in m.relay.parameters()]
    assert lstm and all(p.grad is not None for p in lstm) and sum(p.grad.abs().sum() for p in lstm) > 0
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision trains too, every LSTM reached
        out = model(x)
    out.float().square().sum().backward()  # outside autocast, as PyTorch's AMP recipe has it
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in lstm)
    model.eval()
    with torch.no_grad():
        alone, in_batch = model(x[1:2]), model(x)[1:2]
    # the same sample through other kernels (batch 1 vs 3): float32 rounding, measured below 2e-6 here
    torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh, _ = _converted(family)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


class NormActBlock(nn.Module):
    """A residual block on timm's BatchNormAct2d (the norm applies its own activation)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = timm.layers.BatchNormAct2d(channels, act_layer=nn.SiLU)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = timm.layers.BatchNormAct2d(channels, apply_act=False)

    def forward(self, x):
        return x + self.bn2(self.conv2(self.bn1(self.conv1(x))))


def norm_act_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), NormActBlock(8), NormActBlock(8), nn.Flatten(2),
                         nn.Linear(64, 5))


def test_batchnorm_act_keeps_its_activation():
    torch.manual_seed(0)
    model = convert(norm_act_net(), "hn")
    wrapped = model[1].bn1
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], HyperNorm)
    assert type(wrapped[0].norm) is nn.BatchNorm2d and isinstance(wrapped[-1], nn.SiLU)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(wrapped(x), torch.nn.functional.silu(wrapped[0](x)))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 5)


def test_explicit_kind_that_cannot_serve_the_layout_is_refused_at_convert_time():
    model = small_convnext_torchvision()
    with pytest.raises(ValueError, match=r"norm='bhn' cannot serve features\.1\.0\.block\.2, a LayerNorm over the "
                                         r"last dim.*use norm='hn'"):
        convert(model, "bhn")
    assert not any(isinstance(m, HyperNorm) for m in model.modules())
    vit = small_vit_timm()
    with pytest.raises(ValueError, match="cannot serve blocks.0.norm1"):
        convert(vit, "ghn")


def test_clhn_serves_channels_last_and_nchw_layer_norms():
    torch.manual_seed(0)
    model = convert(small_convnext_torchvision(), "clhn")
    assert type(model.features[1][0].block[2].norm) is nn.LayerNorm
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    resnet = convert(torchvision.models.resnet18(num_classes=4), "clhn")
    assert type(resnet.layer1[0].bn1.norm).__name__ == "LayerNorm2d"
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_model_without_stages_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match=r"DenseNet.*norm_index=0.*stages=.*norm_index=.*skip="):
        convert(torchvision.models.densenet121(num_classes=10), "hn")  # its first norms grow block by block


def test_plan_text_names_blocks_norms_widths_and_skips():
    text = str(convert(torchvision.models.mobilenet_v3_small(), "hn", norm_index=-1, dry_run=True))
    assert "stage features[4..6]: 3 blocks, width 40" in text and "features.4.block.3.1 (BatchNorm2d)" in text
    assert "skipped features.1: its chosen norm's width 16" in text


# one family per layout: BN in torchvision blocks (projection norms), channels-last LayerNorm, token LayerNorm,
# BN in stages nested in one Sequential. compile_check is the docs table's check (eval and a train forward, the
# bound from each output's own float32 rounding); the two large graphs use aot_eager (the same fullgraph capture
# without inductor's C++ code generation, minutes on 2 cores; docs/convert.md's table runs inductor on them).
@pytest.mark.parametrize("family, backend", [("tv_mobilenet_v3_small", "aot_eager"),
                                             ("timm_convnext_atto", "aot_eager"), ("tv_vit", "inductor"),
                                             ("nested_sequential", "inductor")])
def test_compile_fullgraph_matches_eager_per_family(family, backend):
    model, size = _converted(family)
    torch.manual_seed(1)
    assert compile_check(model, torch.randn(3, 3, size, size), backend) == "yes"


def test_compile_fullgraph_matches_eager_with_batchnorm_act():
    torch.manual_seed(0)
    assert compile_check(convert(norm_act_net(), "hn"), torch.randn(4, 3, 8, 8)) == "yes"


class GraphBreakHead(nn.Module):
    def forward(self, x):
        torch._dynamo.graph_break()
        return x


def test_compile_check_reports_a_graph_break_in_one_line():
    torch.manual_seed(0)
    model = convert(NestedStages(), "hn")
    model.head = nn.Sequential(model.head, GraphBreakHead())
    result = compile_check(model, torch.randn(2, 3, 16, 16))
    assert result.startswith("fails (eval): ") and "\n" not in result


def test_stages_at_several_depths_listed_in_model_order():
    from hypernorm.nn import find_stages
    model = nn.Sequential(Block(4), Block(4), nn.Sequential(Block(8), Block(8)), Block(4), Block(4))
    assert find_stages(model) == ["(model)[0..1]", "2", "(model)[3..4]"]


@pytest.mark.parametrize("shape", [(3, 5, 8), (3, 4, 4, 8)], ids=["tokens", "channels_last_map"])
def test_channels_last_layer_is_the_papers_formula_over_the_last_dim(shape):
    layer = HyperNorm(8, nn.LayerNorm(8, elementwise_affine=False), channels_last=True)
    x = torch.randn(shape)
    h, c = layer.relay.cell.forward_reference(x.mean(dim=tuple(range(1, x.dim() - 1))))  # GAP over tokens/H, W
    view = (shape[0],) + (1,) * (len(shape) - 2) + (8,)
    expected = h.view(view) * nn.functional.layer_norm(x, (8,)) + c.view(view)
    # the fused LSTM GEMMs against the equations: float32 rounding of two 8-wide matmuls
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, \.\.\., 8\), got \(3, 8, 5\)"):
        layer(torch.randn(3, 8, 5))
