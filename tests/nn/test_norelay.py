"""The no-relay ablation ("bhn_norelay"): the same parameters as BHN, only the relay of (h, c) is cut."""
import copy

import pytest
import torch
from torch import nn

from hypernorm.models import create_model
from hypernorm.nn import HyperNorm, convert, create_norm_layer, set_fused, share_relay, split_norm_name, split_relay

from ..conftest import TinyNet


def hn_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HyperNorm)]


def test_names_split_into_norm_and_relay():
    assert split_relay("bhn_norelay") == ("bhn", False) and split_relay("ghn") == ("ghn", True)
    assert split_norm_name("ghn_norelay") == ("gn", True)
    with pytest.raises(ValueError, match=r"'bn_norelay'.*only follows a HyperNorm name"):
        split_norm_name("bn_norelay")
    assert not create_norm_layer("bhn_norelay", 8).relayed and create_norm_layer("bhn", 8).relayed


@pytest.mark.parametrize("model_name", ["resnet20", "resnet164"])
def test_same_parameters_and_state_dict_keys_as_bhn(model_name):
    relayed = create_model(model_name, "bhn", num_classes=10)
    ablated = create_model(model_name, "bhn_norelay", num_classes=10)
    assert {k: v.shape for k, v in ablated.state_dict().items()} == {k: v.shape for k, v in relayed.state_dict().items()}
    assert sum(p.numel() for p in ablated.parameters()) == sum(p.numel() for p in relayed.parameters())
    assert all(not layer.relayed for _, layer in hn_layers(ablated))
    assert all(layer.relayed for _, layer in hn_layers(relayed))


def _outputs(model, x):
    """Each HyperNorm's output, by name, for one eval forward pass."""
    outputs, hooks = {}, []
    for name, layer in hn_layers(model):
        hooks.append(layer.register_forward_hook(lambda m, args, y, name=name: outputs.__setitem__(name, y)))
    model(x)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("fused_path", [True, False])
def test_same_weights_equal_at_first_block_and_differ_after(fused_path):
    relayed = create_model("resnet20", "bhn", num_classes=10)
    ablated = create_model("resnet20", "bhn_norelay", num_classes=10)
    ablated.load_state_dict(relayed.state_dict())
    for model in (relayed, ablated):
        set_fused(model, fused_path).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = _outputs(relayed, x), _outputs(ablated, x)
    torch.testing.assert_close(b["layer1.0.bn1"], a["layer1.0.bn1"], rtol=0, atol=0)
    for name in ("layer1.1.bn1", "layer1.2.bn1"):  # the relay is the only difference up to here
        assert (b[name] - a[name]).abs().max() > 1e-3, name


def test_every_block_starts_from_zero_state():
    """Each no-relay layer's output is its LSTM's first step on its own input, whatever came before."""
    model = convert(TinyNet(), "bhn_norelay").eval()
    inputs, outputs, hooks = {}, {}, []
    for name, layer in hn_layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
        hooks.append(layer.register_forward_hook(lambda m, args, y, name=name: outputs.__setitem__(name, y)))
    with torch.no_grad():
        model(torch.randn(3, 3, 8, 8))
        for name, layer in hn_layers(model):
            x = inputs[name]
            h, c = layer.relay.cell.forward_reference(x.mean(dim=(2, 3)), None)
            expected = h[:, :, None, None] * layer.norm(x) + c[:, :, None, None]
            # fused vs reference path: float32 rounding of the LSTM step and the affine (measured 6e-8)
            torch.testing.assert_close(outputs[name], expected, rtol=1e-5, atol=1e-5)
    assert len(inputs) == 4


def test_share_relay_keeps_each_layers_choice():
    layers = [HyperNorm(8, relayed=False) for _ in range(3)]
    share_relay(layers)
    assert all(not layer.relayed for layer in layers) and layers[1].relay is layers[0].relay


def test_eval_output_independent_of_batch():
    model = convert(TinyNet(), "bhn_norelay").eval()
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]))
    assert model.stage1[0].bn1.relay.state is None


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_matches_eager_without_graph_breaks(mode):
    model = getattr(convert(TinyNet(), "bhn_norelay"), mode)()
    x = torch.randn(4, 3, 8, 8)
    expected = copy.deepcopy(model)(x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    """DDP without unused parameters: the hidden-path maps still get gradients (their biases act on a zero state)."""
    model = convert(TinyNet(), "bhn_norelay")
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert isinstance(model.stage1[0].bn1.norm, nn.BatchNorm2d)
