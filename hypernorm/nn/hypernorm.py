"""HyperNorm: standardize with a wrapped norm, then apply a per-sample affine from a relayed meta LSTM."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .meta_lstm import FusedWeights, TrimmedLSTMCell
from .norms import create_base_norm

__all__ = ["StageRelay", "HyperNorm", "share_relay"]


class StageRelay(nn.Module):
    """The meta LSTM of one network stage and the (h, c) it relays from block to block.

    ``state`` is transient: the stage's first HyperNorm starts from zeros and its last one clears it,
    so nothing survives from one forward pass to the next.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.cell = TrimmedLSTMCell(channels, reduction)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.weights: FusedWeights | None = None  # the cell's fused GEMM weights, built once per pass

    @property
    def channels(self) -> int:
        return self.cell.channels


class HyperNorm(nn.Module):
    """y = h * norm(x) + c, with (h, c) = LSTM(GAP(x), state relayed from the previous block).

    Args:
        num_features: channels C of the (N, C, H, W) input.
        norm: the standardizer, as a registered name ("bn", "syncbn", "gn", "in", "ln", "sn") or a
            module without affine parameters (its running statistics and train/eval behaviour are kept).
        reduction: bottleneck ratio r of the LSTM's gate maps, Linear(C, C/r) -> ReLU -> Linear(C/r, 4C).
        name: shown in error messages; :func:`hypernorm.convert` sets the qualified module name.

    A layer built alone owns a private LSTM and starts from zero state on every call. :func:`share_relay`
    makes the layers of one stage share one LSTM and relay its state.
    """

    def __init__(
        self,
        num_features: int,
        norm: str | nn.Module = "bn",
        reduction: int = 4,
        name: str = "",
    ) -> None:
        super().__init__()
        if isinstance(norm, str):
            norm = create_base_norm(norm, num_features, affine=False)
        if getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None:
            raise ValueError(f"HyperNorm {name!r}: the wrapped {type(norm).__name__} must have no affine parameters")
        self.num_features = num_features
        self.name = name or "HyperNorm"
        self.norm = norm
        self.relay = StageRelay(num_features, reduction)
        self.starts_stage = True
        self.ends_stage = True

    # False selects the reference path (standardizer module, then the affine), e.g. for comparisons.
    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.name}: expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}"
            )
        if not self.fused:
            return self._forward_reference(x)
        if _can_fuse(self.norm) and not _small_eager_training(x):
            return self._forward_fused(x)
        # the standardizer's own kernel, then the affine; the LSTM step still as two GEMMs
        h, c = self._lstm_step(x.mean(dim=(2, 3)))
        return torch.addcmul(c[:, :, None, None], self.norm(x), h[:, :, None, None])

    def _lstm_step(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) from the relayed state; the cell's fused weights are built at the stage's first layer
        and reused by the others."""
        relay = self.relay
        weights = relay.weights if not self.starts_stage and relay.weights is not None else None
        if weights is None:
            weights = relay.cell.fused_weights()
        h, c = relay.cell(u, None if self.starts_stage else relay.state, weights)
        relay.state = None if self.ends_stage else (h, c)
        relay.weights = None if self.ends_stage else weights
        return h, c

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as the paper writes it: x_hat = norm(x), y = h * x_hat + c."""
        relay = self.relay
        h, c = relay.cell.forward_reference(x.mean(dim=(2, 3)), None if self.starts_stage else relay.state)
        relay.state = None if self.ends_stage else (h, c)
        return torch.addcmul(c[:, :, None, None], self.norm(x), h[:, :, None, None])

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Same result in two passes over x: one for the statistics (the per-sample means are GAP(x)),
        one for y = x * scale + shift with scale = h / sigma and shift = c - h * mu / sigma."""
        u, mean, invstd = _moments(self.norm, x)
        h, c = self._lstm_step(u)
        scale = h * invstd
        shift = torch.addcmul(c, mean, scale, value=-1)
        if scale.dtype != x.dtype:  # autocast: y in x's dtype, as the norm gives
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        if _eager_autograd(x):
            return _Affine.apply(x, scale, shift)
        # mul then add_: on CPU a broadcasting addcmul is several times slower than the two
        return torch.mul(x, scale[:, :, None, None]).add_(shift[:, :, None, None])

    def _follow(self, relay: StageRelay) -> None:
        """Use ``relay`` without registering it: the stage's first layer owns it in the state_dict."""
        if "relay" in self._modules:
            del self._modules["relay"]
        object.__setattr__(self, "relay", relay)
        self.starts_stage = False

    def extra_repr(self) -> str:
        role = "owns the stage LSTM" if self.starts_stage else "relays the stage LSTM"
        return f"{self.num_features}, {role}, ends_stage={self.ends_stage}"


# Below this many elements an eager training step is bound by the per-op cost of autograd, not by passes
# over memory, and the reference path (one native norm kernel, fewer graph nodes) is the faster one.
SMALL_EAGER_TRAINING_NUMEL = 1 << 18


def _small_eager_training(x: torch.Tensor) -> bool:
    return x.numel() < SMALL_EAGER_TRAINING_NUMEL and _eager_autograd(x)


def _can_fuse(norm: nn.Module) -> bool:
    """Standardizers whose statistics :func:`_moments` reproduces exactly (subclasses may change them)."""
    kind = type(norm)
    if kind is nn.BatchNorm2d:
        return True
    if kind is nn.SyncBatchNorm:  # in training it reduces across processes; in eval it is a BatchNorm
        return not norm.training and norm.track_running_stats
    if kind is nn.GroupNorm:
        return True
    if kind is nn.InstanceNorm2d:
        return not norm.track_running_stats
    return False


def _moments(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GAP(x), mu, 1/sigma) for the standardizer ``norm``, each of shape (N, C) or (C,).

    One pass over x gives the mean and the mean square of every (sample, channel) (two fast inner
    reductions; the CPU's var_mean over (H, W) is many times slower). The batch or group statistics
    follow from them, and the means are the GAP that feeds the LSTM. Batch norms in training update
    their running statistics here, as F.batch_norm does.
    """
    N, C, H, W = x.shape
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not (norm.training or norm.running_mean is None):
        return x.mean(dim=(2, 3)), norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)  # eval: fold
    u, square = _SampleMoments.apply(x) if _eager_autograd(x) else _sample_moments(x)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if N * H * W == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean = u.mean(0)
        var = (square.mean(0) - mean * mean).clamp_min(0)  # clamp: rounding may leave a tiny negative
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean, var, N * H * W)
        return u, mean, torch.rsqrt(var + norm.eps)
    if isinstance(norm, nn.GroupNorm):
        G = norm.num_groups
        mean_ng = u.view(N, G, C // G).mean(2)
        var_ng = (square.view(N, G, C // G).mean(2) - mean_ng * mean_ng).clamp_min(0)
        return u, _per_channel(mean_ng, C), _per_channel(torch.rsqrt(var_ng + norm.eps), C)
    return u, u, torch.rsqrt((square - u * u).clamp_min(0) + norm.eps)  # instance norm


def _sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square over (H, W) of every (sample, channel), each (N, C)."""
    return x.mean(dim=(2, 3)), _sum_of_products(x, x) / (x.shape[2] * x.shape[3])


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over (H, W) of a * b, (N, C), without materializing a * b where the layout allows."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))
    return (a * b).sum(dim=(2, 3))  # e.g. channels-last: flatten(2) would copy both


def _eager_autograd(x: torch.Tensor) -> bool:
    """Whether eager autograd will record x's graph: then the hand-written backwards below save passes.
    A compiled graph fuses the plain ops by itself."""
    return x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _SampleMoments(torch.autograd.Function):
    """:func:`_sample_moments` with a one-pass backward: dx = dm / HW + x * 2 dq / HW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        return _sample_moments(x)

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_square: torch.Tensor | None) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        count = x.shape[2] * x.shape[3]
        grad = (grad_mean / count)[:, :, None, None] if grad_mean is not None else x.new_zeros(())
        if grad_square is None:
            return grad.expand_as(x).clone(memory_format=torch.preserve_format)
        return torch.mul(x, (grad_square * (2 / count))[:, :, None, None]).add_(grad)


class _Affine(torch.autograd.Function):
    """y = x * scale + shift with per-(sample, channel) scale and shift; the backward reads the gradient
    and x once each instead of materializing grad * x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        return torch.mul(x, scale[:, :, None, None]).add_(shift[:, :, None, None])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, scale = ctx.saved_tensors
        return grad * scale[:, :, None, None], _sum_of_products(grad, x), grad.sum(dim=(2, 3))


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, G) group values -> (N, C), each group's value repeated over its channels."""
    N, G = t.shape
    return t[:, :, None].expand(N, G, channels // G).reshape(N, channels)


def _update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    """What F.batch_norm does to the buffers in training: unbiased variance, (cumulative) momentum."""
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        # a tensor, not float(): a compiled graph would break on reading the counter
        momentum = 1.0 / norm.num_batches_tracked if norm.momentum is None else norm.momentum
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
        norm.running_var.lerp_((var * (count / (count - 1))).to(norm.running_var.dtype), momentum)


def share_relay(layers: Sequence[HyperNorm]) -> StageRelay:
    """Make ``layers`` (in execution order) one relay stage; returns the shared :class:`StageRelay`.

    The first layer keeps its LSTM and registers it (one set of keys in ``state_dict``); the others use
    it and hand (h, c) on; the last clears it.
    """
    if not layers:
        raise ValueError("share_relay needs at least one HyperNorm layer")
    widths = {layer.num_features for layer in layers}
    if len(widths) != 1:
        names = ", ".join(f"{layer.name}({layer.num_features})" for layer in layers)
        raise ValueError(f"the layers of one relay stage must have one width, got {names}")
    first, *rest = layers
    relay = first.relay
    first.relay = relay  # registers it, should ``first`` have been a follower before
    first.starts_stage = True
    for layer in rest:
        layer._follow(relay)
    for layer in layers:
        layer.ends_stage = layer is layers[-1]
    return relay
