import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hypernorm.nn import HyperNorm, StageRelay, TrimmedLSTMCell, share_relay


def mlp(seq, u):
    return F.linear(F.relu(F.linear(u, seq[0].weight, seq[0].bias)), seq[2].weight, seq[2].bias)


def lstm_by_hand(cell: TrimmedLSTMCell, u, h, c):
    gates = mlp(cell.input_map, u) + mlp(cell.hidden_map, h)
    C = cell.channels
    i, f, g, o = (gates[:, k * C:(k + 1) * C] for k in range(4))
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.sigmoid(c_new), c_new


def bn_by_hand(x, mean, var, eps=1e-5):
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)


def test_cell_shapes_and_scale_range():
    cell = TrimmedLSTMCell(16, reduction=4)
    assert cell.input_map[0].out_features == 4 and cell.input_map[2].out_features == 64
    u = torch.randn(3, 16) * 10
    h, c = cell(u)
    assert h.shape == c.shape == (3, 16)
    assert bool((h > 0).all() and (h < 1).all())


def test_cell_parameter_count():
    # 2 maps x (C*C/4 + C/4 + C/4*4C + 4C) = 2.5 C^2 + 8.5 C for C divisible by 4
    C = 64
    assert sum(p.numel() for p in TrimmedLSTMCell(C).parameters()) == int(2.5 * C * C + 8.5 * C)


@pytest.mark.parametrize("training", [True, False])
def test_layer_matches_formula(training):
    layer = HyperNorm(6, "bn")
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    if not training:  # give the running statistics non-trivial values first
        layer.train()
        layer(torch.randn(8, 6, 5, 5) * 2 + 0.5)
        layer.eval()
    y = layer(x)
    zeros = torch.zeros(4, 6)
    h, c = lstm_by_hand(layer.relay.cell, x.mean((2, 3)), zeros, zeros)
    if training:
        x_hat = bn_by_hand(x, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
    else:
        x_hat = bn_by_hand(x, layer.norm.running_mean, layer.norm.running_var)
    torch.testing.assert_close(y, h[:, :, None, None] * x_hat + c[:, :, None, None])


def test_layer_wraps_groupnorm():
    layer = HyperNorm(8, "gn")
    x = torch.randn(2, 8, 3, 3)
    zeros = torch.zeros(2, 8)
    h, c = lstm_by_hand(layer.relay.cell, x.mean((2, 3)), zeros, zeros)
    x_hat = F.group_norm(x, layer.norm.num_groups)
    torch.testing.assert_close(layer(x), h[:, :, None, None] * x_hat + c[:, :, None, None])


def test_relay_carries_state_between_blocks():
    first, second = HyperNorm(6), HyperNorm(6)
    relay = share_relay([first, second])
    assert second.relay is relay and first.relay is relay
    x1, x2 = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    first.eval(), second.eval()
    first(x1)
    y2 = second(x2)
    zeros = torch.zeros(3, 6)
    h1, c1 = lstm_by_hand(relay.cell, x1.mean((2, 3)), zeros, zeros)
    h2, c2 = lstm_by_hand(relay.cell, x2.mean((2, 3)), h1, c1)
    torch.testing.assert_close(y2, h2[:, :, None, None] * second.norm(x2) + c2[:, :, None, None])
    # and it is not what a fresh start would give
    h0, c0 = lstm_by_hand(relay.cell, x2.mean((2, 3)), zeros, zeros)
    assert not torch.allclose(y2, h0[:, :, None, None] * second.norm(x2) + c0[:, :, None, None])
    assert relay.state is None, "the last layer of the stage clears the relay state"


def test_stage_restarts_from_zero_on_each_pass():
    layers = [HyperNorm(4) for _ in range(3)]
    share_relay(layers)
    x = torch.randn(2, 4, 3, 3)

    def stage(x):
        for layer in layers:
            x = layer(x)
        return x

    torch.testing.assert_close(stage(x), stage(x))


def test_shared_relay_registered_once():
    stage = nn.Sequential(HyperNorm(4), HyperNorm(4), HyperNorm(4))
    share_relay(list(stage))
    keys = [k for k in stage.state_dict() if "relay" in k]
    assert keys and all(k.startswith("0.relay.") for k in keys)
    assert sum(p.numel() for p in stage.parameters()) == sum(p.numel() for p in TrimmedLSTMCell(4).parameters())


def test_share_relay_rejects_mixed_widths():
    with pytest.raises(ValueError, match="one width"):
        share_relay([HyperNorm(4, name="a"), HyperNorm(8, name="b")])


def test_wrapped_norm_must_be_affine_free():
    with pytest.raises(ValueError, match="no affine"):
        HyperNorm(4, nn.BatchNorm2d(4))


@pytest.mark.parametrize("shape", [(2, 6, 4), (2, 6), (2, 5, 3, 3)])
def test_bad_input_names_the_layer(shape):
    layer = HyperNorm(6, name="layer1.0.bn1")
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1.*\(N, 6, H, W\)"):
        layer(torch.randn(*shape))


def test_unknown_standardizer_lists_valid_names():
    with pytest.raises(ValueError, match="valid base norms: .*bn"):
        HyperNorm(4, "xx")


def test_relay_is_a_module_with_cell():
    relay = StageRelay(8)
    assert relay.channels == 8 and relay.state is None


@pytest.mark.parametrize("kwargs", [{"num_features": 8.5}, {"num_features": 0}, {"num_features": True},
                                    {"num_features": 8, "reduction": 0}])
def test_bad_sizes_are_named(kwargs):
    name = "num_features" if "reduction" not in kwargs else "reduction"
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        HyperNorm(**kwargs)
