"""HyperNorm at the edges: large mean/std ratios (float32 against float64), empty batches, the relay's
per-pass cache, and inputs of the wrong type."""
import copy

import pytest
import torch
from torch import nn

from hypernorm.nn import HyperNorm, set_fused, share_relay
from hypernorm.nn import fused as fused_kernels

from ..conftest import use_cpu_kernel

PATHS = ["cpu-kernel", "one-pass", "native-norm", "reference"]


def _select_path(layer: nn.Module, path: str, monkeypatch) -> None:
    """cpu-kernel: the C++ kernel first (it declines a mean far from its spread); one-pass: the Python direct
    or shifted path; native-norm: the norm's own kernel; reference: the layer as the paper writes it."""
    use_cpu_kernel(monkeypatch, path == "cpu-kernel")
    set_fused(layer, path != "reference")
    limit = 0 if path == "one-pass" else 1 << 40
    monkeypatch.setattr(fused_kernels, "SMALL_EAGER_TRAINING_NUMEL", limit)
    monkeypatch.setattr(fused_kernels, "SMALL_EAGER_TRAINING_NUMEL_CPU", limit)


def _run(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * weights).sum().backward()
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("norm", ["bn", "bn-eval", "gn", "in"])
@pytest.mark.parametrize("path", PATHS)
def test_float32_matches_float64_at_large_mean_over_std(norm, ratio, path, monkeypatch):
    """mean/std up to 1e4: outputs and gradients within 1e-4 of the largest float64 value. The mean is 1
    and the spread 1/ratio (eps shrunk below the variance), so that the LSTM sees inputs near 1 and its
    gradients are not saturated to zero."""
    layer = HyperNorm(16, norm.removesuffix("-eval"))
    layer.norm.eps = 1e-6 / ratio**2
    if norm == "bn-eval":
        layer.norm.running_mean.fill_(1.0 + 0.3 / ratio)
        layer.norm.running_var.fill_(2.0 / ratio**2)
        layer.eval()
    _select_path(layer, path, monkeypatch)
    reference = copy.deepcopy(layer).double()
    x = 1.0 + torch.randn(8, 16, 6, 6) / ratio
    weights = torch.randn(8, 16, 6, 6)
    got, expected = _run(layer, x, weights), _run(reference, x.double(), weights.double())
    for a, b in zip(got, expected):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()
    if norm == "bn":
        for key in ("running_mean", "running_var"):
            b = getattr(reference.norm, key)
            assert (getattr(layer.norm, key).double() - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm", ["bn", "gn", "in"])
def test_empty_batch_keeps_statistics(norm, path, monkeypatch):
    layer = HyperNorm(4, norm)
    _select_path(layer, path, monkeypatch)
    before = copy.deepcopy(layer.norm.state_dict())
    with torch.no_grad():
        y = layer(torch.randn(0, 4, 5, 5))
    assert y.shape == (0, 4, 5, 5)
    for key, value in layer.norm.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert layer.relay.state is None and layer.relay.weights is None


def test_relay_cache_does_not_outlive_a_pass_with_mixed_paths(monkeypatch):
    """A fused middle layer between reference ones: its cached fused weights must not survive into the next
    pass, where they would be stale after a weight update."""
    monkeypatch.setattr(fused_kernels, "SMALL_EAGER_TRAINING_NUMEL", 0)
    layers = [HyperNorm(6, "bn") for _ in range(3)]
    share_relay(layers)
    layers[0].fused = layers[2].fused = False
    stage = nn.Sequential(*layers)
    x = torch.randn(4, 6, 5, 5)
    stage(x)
    assert layers[0].relay.weights is None and layers[0].relay.state is None
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.5)
    reference = set_fused(copy.deepcopy(stage), False)
    torch.testing.assert_close(stage(x), reference(x), rtol=1e-4, atol=1e-5)


def test_integer_input_is_refused():
    layer = HyperNorm(3, "bn", name="layer1.0.bn1")
    with pytest.raises(TypeError, match=r"^layer1\.0\.bn1: expected a floating-point input, got torch.int64$"):
        layer(torch.ones(2, 3, 4, 4, dtype=torch.long))


def test_dtype_mismatch_is_refused_outside_autocast():
    layer = HyperNorm(3, "bn", name="stage1.bn")
    with pytest.raises(ValueError, match=r"^stage1\.bn: input dtype torch.float64 does not match .*torch.float32"):
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 4, 4).bfloat16()).shape == (2, 3, 4, 4)
