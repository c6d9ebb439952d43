import pytest
import torch
import torch.nn.functional as F

from hypernorm.nn import HyperNorm, SwitchableNorm2d, create_norm_layer, split_norm_name


def _definition(x, mean_logits, var_logits, mean_bn=None, var_bn=None, eps=1e-5):
    """SN written out from the paper: statistics over (H, W), (C, H, W) and (N, H, W), biased variances."""
    stats = [
        (x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)),
        (x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)),
        (x.mean((0, 2, 3), keepdim=True) if mean_bn is None else mean_bn.view(1, -1, 1, 1),
         x.var((0, 2, 3), unbiased=False, keepdim=True) if var_bn is None else var_bn.view(1, -1, 1, 1)),
    ]
    wm, wv = mean_logits.softmax(0), var_logits.softmax(0)
    mean = sum(w * m for w, (m, _) in zip(wm, stats))
    var = sum(w * v for w, (_, v) in zip(wv, stats))
    return (x - mean) / torch.sqrt(var + eps)


def _random_sn(channels=3):
    sn = SwitchableNorm2d(channels)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.3, -1.0, 0.8]))
        sn.var_weight.copy_(torch.tensor([-0.5, 0.2, 1.1]))
        sn.weight.uniform_(0.5, 1.5)
        sn.bias.uniform_(-1, 1)
    return sn


def test_train_output_matches_definition():
    sn = _random_sn()
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    expected = _definition(x, sn.mean_weight, sn.var_weight)
    expected = expected * sn.weight.view(1, -1, 1, 1) + sn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(sn(x), expected)


def test_moving_averages_update_and_replace_batch_statistics_in_eval():
    sn = _random_sn()
    x = torch.randn(4, 3, 5, 6) * 2 + 0.5
    sn(x)
    torch.testing.assert_close(sn.running_mean, 0.9 * torch.zeros(3) + 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(sn.running_var, 0.9 * torch.ones(3) + 0.1 * x.var((0, 2, 3), unbiased=False))
    sn.eval()
    y = torch.randn(3, 3, 4, 4)
    expected = _definition(y, sn.mean_weight, sn.var_weight, sn.running_mean, sn.running_var)
    expected = expected * sn.weight.view(1, -1, 1, 1) + sn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(sn(y), expected)
    torch.testing.assert_close(sn(y)[1:2], sn(y[1:2]))  # eval: no dependence on batch neighbours


@pytest.mark.parametrize("which, reference", [
    (0, lambda x: F.instance_norm(x)),
    (1, lambda x: F.group_norm(x, 1)),
    (2, lambda x: F.batch_norm(x, None, None, training=True)),
])
def test_one_hot_importance_reduces_to_in_ln_bn(which, reference):
    sn = SwitchableNorm2d(4, affine=False)
    logits = torch.full((3,), -1e4)
    logits[which] = 0.0
    with torch.no_grad():
        sn.mean_weight.copy_(logits)
        sn.var_weight.copy_(logits)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sn(x), reference(x), rtol=1e-4, atol=1e-4)


def test_gradients_reach_mixture_weights():
    sn = _random_sn()
    (sn(torch.randn(2, 3, 4, 4)) * torch.randn(2, 3, 4, 4)).sum().backward()
    assert sn.mean_weight.grad.abs().sum() > 0 and sn.var_weight.grad.abs().sum() > 0


def test_registered_as_sn_and_shn():
    assert split_norm_name("shn") == ("sn", True)
    assert isinstance(create_norm_layer("sn", 8), SwitchableNorm2d)
    layer = create_norm_layer("shn", 8)
    assert isinstance(layer, HyperNorm) and isinstance(layer.norm, SwitchableNorm2d) and layer.norm.weight is None
    assert layer(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        SwitchableNorm2d(3)(torch.randn(2, 4, 3, 3))


def test_convert_hn_keeps_switchable_statistics_and_mixture():
    from hypernorm import convert, create_model

    model = create_model("resnet20", "sn")
    old = model.layer1[0].bn1
    with torch.no_grad():
        old.mean_weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        old.running_mean.fill_(0.25)
    convert(model, "hn")
    new = model.layer1[0].bn1
    assert isinstance(new, HyperNorm) and isinstance(new.norm, SwitchableNorm2d) and new.norm.weight is None
    torch.testing.assert_close(new.norm.mean_weight.detach(), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(new.norm.running_mean, torch.full((16,), 0.25))
