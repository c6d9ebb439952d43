"""HyperNorm's fused kernels (the standardizer's statistics and the per-sample affine in two passes over x)
and the shifted standardization that keeps every path accurate in float32.

The moments are taken of d = x - s, with s an estimate of the mean read from x itself (:func:`_shift`; BN in
eval: its running mean). Shifting keeps E[d^2] - E[d]^2 free of cancellation when the mean is large against
the standard deviation, and y = d * scale + bias then never subtracts two large numbers either: float32 stays
within 1e-4 of float64 (relative to the largest value) up to mean/std = 1e4 (tests/nn/test_numerics.py).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .sync_batchnorm import CPUSyncBatchNorm

__all__ = ["autocast_enabled", "can_fuse", "small_eager_training", "fused_standardize_affine", "standardize", "SMALL_EAGER_TRAINING_NUMEL",
           "SMALL_EAGER_TRAINING_NUMEL_CPU"]

# Below this many elements an eager training step is bound by the per-op cost of autograd, not by passes
# over memory, and the reference path (one native norm kernel, fewer graph nodes) is the faster one.
SMALL_EAGER_TRAINING_NUMEL = 1 << 18
# The same on CPU, where the direct path (three autograd nodes a layer) beats the native kernel at every size
# measured (docs/performance.md).
SMALL_EAGER_TRAINING_NUMEL_CPU = 0

# Below this mean/std the norms' float32 kernels lose nothing to cancellation (an error of about
# (mean/std)^2 float32 roundings), and standardize() leaves their input as it is.
FAR_MEAN_OVER_STD = 8.0


def per_map(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1), to broadcast over each feature map. A view costs a third of t[:, :, None, None]
    (about 1 against 2.5 us here), and an eager layer does this a dozen times a step."""
    n, c = t.shape
    return t.view(n, c, 1, 1)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device type without autocast (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False
    except TypeError:  # torch < 2.4 asks per device type by name
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def small_eager_training(x: torch.Tensor) -> bool:
    limit = SMALL_EAGER_TRAINING_NUMEL_CPU if x.device.type == "cpu" else SMALL_EAGER_TRAINING_NUMEL
    return x.numel() < limit and eager_autograd(x)


def is_local_batchnorm(norm: nn.Module) -> bool:
    """A BatchNorm2d, or a SyncBatchNorm in eval (training reduces across processes; eval is a BatchNorm), and
    not a subclass (which may change the statistics)."""
    kind = type(norm)
    if kind is nn.BatchNorm2d:
        return True
    return kind in (nn.SyncBatchNorm, CPUSyncBatchNorm) and not norm.training and norm.track_running_stats


def check_batch_statistics(x: torch.Tensor) -> None:
    """BatchNorm's refusal of batch statistics over a single value per channel, with its message."""
    N, _, H, W = x.shape
    if N * H * W == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def can_fuse(norm: nn.Module) -> bool:
    """Standardizers whose statistics :func:`fused_standardize_affine` reproduces (subclasses may change them)."""
    if is_local_batchnorm(norm):
        return True
    kind = type(norm)
    if kind is nn.GroupNorm:
        return True
    if kind is nn.InstanceNorm2d:
        return not norm.track_running_stats
    return False


def eager_autograd(x: torch.Tensor) -> bool:
    """Whether eager autograd will record x's graph: then the hand-written backwards below save passes.
    A compiled graph fuses the plain ops by itself."""
    return x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def fused_standardize_affine(norm: nn.Module, x: torch.Tensor, lstm_step) -> torch.Tensor:
    """y = h * norm(x) + c with (h, c) = lstm_step(GAP(x)), in as few passes over x as the norm's own kernel.

    Eager CPU float: :func:`_direct_standardize_affine` (no shifted copy of x) wherever the mean is within
    FAR_MEAN_OVER_STD of the spread; elsewhere, on CUDA and under compile the shifted form below."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling() \
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        y = _direct_standardize_affine(norm, x, lstm_step)
        if y is not None:
            return y
    return _shifted_standardize_affine(norm, x, lstm_step)


def _direct_standardize_affine(norm: nn.Module, x: torch.Tensor, lstm_step) -> torch.Tensor | None:
    """y = x * scale + bias, scale = h / sigma, bias = c - h * mu / sigma, from unshifted moments (two
    reductions that allocate nothing). None, before any state changes, where some mean is farther than
    FAR_MEAN_OVER_STD from its spread: there E[x^2] - E[x]^2 and x * scale + bias would cancel.

    On CPU an allocation can cost more than a pass (glibc's heap returns freed memory to the system past its
    trim threshold, and the pages fault in again next step), so this path allocates what BN does: the
    output, and in the backward the input gradient, written once. In training it records two autograd nodes
    besides the LSTM step's one: :class:`_Statistics` and :class:`_DirectAffine`, which hand each other the
    output gradient."""
    # The full-size output first, before the layer's small temporaries: allocated after them, it lands above
    # them at the top of the heap and is given back to the system when freed, to fault in again next pass.
    link = _BackwardLink(torch.empty_like(x))
    autograd = eager_autograd(x)
    if _is_eval_bn(norm):
        mean, invstd, far = _running_statistics(norm)
        if far:
            return None
        m = _Statistics.apply(x, norm, link)[0] if autograd else x.mean(dim=(2, 3))
    else:
        m, mean, invstd = _Statistics.apply(x, norm, link) if autograd else _statistics(x, norm, link)
        batch_mean, batch_var, link.mean, link.var = link.mean, link.var, None, None  # the graph's nodes hold
        # the link: a tensor of this pass left in it would be a reference cycle that keeps the pass alive
        if link.far:
            return None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
            _update_running_stats(norm, batch_mean, batch_var, x.shape[0] * x.shape[2] * x.shape[3])
    h, c = lstm_step(m)
    if autograd:
        return _DirectAffine.apply(x, h, c, mean, invstd, link)
    scale = h * invstd
    bias = torch.addcmul(c, mean, scale, value=-1)
    if torch.is_grad_enabled():  # parameters need gradients (x does not): autograd's own ops
        return torch.mul(x, per_map(scale)).add_(per_map(bias))
    return torch.mul(x, per_map(scale), out=link.out).add_(per_map(bias))


def _is_eval_bn(norm: nn.Module) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and not (norm.training or norm.running_mean is None)


class _BackwardLink:
    """The layer's output buffer; what :func:`_statistics` leaves for the caller (far, the group mean and
    variance); and what :class:`_DirectAffine`'s backward hands to :class:`_Statistics`' backward, which
    runs after it (the statistics feed scale and bias) and writes the whole input gradient at once."""
    far = False
    grad_input: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out


def _statistics(x: torch.Tensor, norm: nn.Module, link: _BackwardLink) -> tuple[torch.Tensor, ...]:
    """(GAP(x), per-channel mean, per-channel 1/sigma) of the standardizer, (N, C) or (C,) for BN in
    training; the group statistics, before they are spread over channels, go to ``link``."""
    N, C, H, W = x.shape
    m = x.mean(dim=(2, 3))
    if _is_eval_bn(norm):
        return m, m.new_empty(0), m.new_empty(0)
    if x.is_contiguous():
        square = torch.linalg.vector_norm(x, dim=(2, 3)).square_().div_(H * W)  # mean square, no copy of x
    else:  # channels-last: vector_norm over the strided H, W takes ~10x as long as x * x into the output buffer
        # (overwritten by the affine later), then a sum; the sum and the mean reduce fast in either layout
        square = torch.mul(x, x, out=link.out).mean(dim=(2, 3))
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        check_batch_statistics(x)
        mean, square = m.mean(0), square.mean(0)
    elif isinstance(norm, nn.GroupNorm):
        G = norm.num_groups
        mean, square = m.view(N, G, C // G).mean(2), square.view(N, G, C // G).mean(2)
    else:
        mean = m
    var = torch.addcmul(square, mean, mean, value=-1).clamp_min_(0)  # clamp: rounding may leave a tiny negative
    invstd = torch.rsqrt(var + norm.eps)
    link.far = float(torch.linalg.vector_norm(mean * invstd, float("inf"))) > FAR_MEAN_OVER_STD
    link.mean, link.var = mean, var
    if isinstance(norm, nn.GroupNorm):
        return m, _per_channel(mean, C), _per_channel(invstd, C)
    return m, mean, invstd


def _running_statistics(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(running mean, 1/sigma, far) of a BN in eval, computed again only after the buffers change (in place,
    as ``load_state_dict`` does, or replaced, as ``.to()`` does)."""
    mean, var = norm.running_mean, norm.running_var
    try:
        versions = (mean._version, var._version, norm.eps)
    except RuntimeError:  # buffers made under inference_mode keep no version counter: no caching
        versions = None
    cached = _RUNNING_CACHE.get(norm)
    if versions is None or cached is None or cached[0] is not mean or cached[1] is not var or cached[2] != versions:
        invstd = torch.rsqrt(var + norm.eps).to(mean.dtype)
        far = float(torch.linalg.vector_norm(mean * invstd, float("inf"))) > FAR_MEAN_OVER_STD
        cached = _RUNNING_CACHE[norm] = (mean, var, versions, invstd, far)
    return mean, cached[3], cached[4]


_RUNNING_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Statistics(torch.autograd.Function):
    """:func:`_statistics` as one node. Backward: dx = grad_y * scale (from the link) + dm / HW
    + x * 2 dq / HW, with dm and dq (q: the mean squares) gathered from the GAP, mean and 1/sigma."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm: nn.Module, link: _BackwardLink) -> tuple[torch.Tensor, ...]:
        outputs = _statistics(x, norm, link)
        ctx.link, ctx.eval_bn = link, _is_eval_bn(norm)
        ctx.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else None
        ctx.batch = isinstance(norm, nn.modules.batchnorm._BatchNorm)
        # Through save_for_backward, never as ctx attributes: the mean and 1/sigma may be this node's own
        # outputs, and an output held by its node is a reference cycle that leaks every step's graph.
        if ctx.eval_bn:
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(x, link.mean, outputs[2] if ctx.groups is None else torch.rsqrt(link.var + norm.eps))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_m: torch.Tensor, grad_mean: torch.Tensor, grad_invstd: torch.Tensor):
        x, *statistics = ctx.saved_tensors
        N, C, H, W = x.shape
        link, count = ctx.link, H * W
        if ctx.eval_bn:
            grad_square = None
        else:
            (mean, invstd), G = statistics, ctx.groups
            if G is not None:  # gradients of the per-channel copies add up per group
                grad_mean, grad_invstd = (g.view(N, G, C // G).sum(2) for g in (grad_mean, grad_invstd))
            grad_var = grad_invstd * invstd.pow(3) * -0.5
            grad_mean = grad_mean - 2 * mean * grad_var
            if ctx.batch:  # mean and var of the N per-sample moments
                grad_m, grad_square = grad_m + grad_mean / N, (grad_var / N).expand(N, C)
            elif G is not None:
                grad_m = grad_m + _per_channel(grad_mean / (C // G), C)
                grad_square = _per_channel(grad_var / (C // G), C)
            else:
                grad_m, grad_square = grad_m + grad_mean, grad_var
        beta = per_map(grad_m / count)
        if link.grad is None:  # the layer's output took no part in the loss
            grad = torch.zeros_like(x)
        else:
            grad = torch.mul(link.grad, per_map(link.scale), out=link.grad_input)
            link.grad = link.scale = link.grad_input = None
        if grad_square is not None:
            grad.addcmul_(x, per_map(grad_square * (2 / count)))
        return grad.add_(beta), None, None


class _DirectAffine(torch.autograd.Function):
    """y = x * scale + bias with scale = h * invstd, bias = c - mean * scale. Its backward reduces the
    output gradient in one pass and leaves the input gradient to :class:`_Statistics`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                link: _BackwardLink) -> torch.Tensor:
        scale = h * invstd
        bias = torch.addcmul(c, mean, scale, value=-1)
        ctx.save_for_backward(x, h, scale, mean, invstd)
        ctx.link = link
        out, link.out = link.out, None
        return torch.mul(x, per_map(scale), out=out).add_(per_map(bias))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, h, scale, mean, invstd = ctx.saved_tensors
        N, C, H, W = x.shape
        ctx.link.grad_input = torch.empty_like(x)  # before the small temporaries, as the forward's output
        if x.is_contiguous():
            # BN's eval backward over N*C channels with mean 0, variance 1: sum(grad * x), sum(grad), one pass
            zeros, ones = x.new_zeros(N * C), x.new_ones(N * C)
            _, grad_xscale, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous().view(1, N * C, H, W), x.view(1, N * C, H, W), None, zeros, ones, None, None,
                False, 0.0, [False, True, True])
        else:  # channels-last: (N, C) sums over the middle of each sample's (HW, C) block; grad * x goes to the
            # input gradient's buffer, which _Statistics' backward overwrites
            grad_xscale = torch.mul(grad, x, out=ctx.link.grad_input).sum(dim=(2, 3))
            grad_bias = grad.sum(dim=(2, 3))
        grad_bias = grad_bias.view(N, C)
        grad_scale = torch.addcmul(grad_xscale.view(N, C), mean, grad_bias, value=-1)
        ctx.link.grad, ctx.link.scale = grad, scale
        grad_mean = grad_invstd = None
        if ctx.needs_input_grad[3]:
            grad_mean = -(grad_bias * scale)
            grad_invstd = grad_scale * h
            if mean.dim() == 1:  # BN: per channel, shared by the batch
                grad_mean, grad_invstd = grad_mean.sum(0), grad_invstd.sum(0)
        return None, grad_scale * invstd, grad_bias, grad_mean, grad_invstd, None


def _shifted_standardize_affine(norm: nn.Module, x: torch.Tensor, lstm_step) -> torch.Tensor:
    """y = h * norm(x) + c: one pass for the moments of d = x - s (the per-sample means plus s are the GAP),
    one for y = d * scale + bias, scale = h / sigma, bias = c - h * (mu - s) / sigma."""
    N, C, H, W = x.shape
    eval_bn = isinstance(norm, nn.modules.batchnorm._BatchNorm) and not (norm.training or norm.running_mean is None)
    shift = norm.running_mean.to(x.dtype)[None, :] if eval_bn else _shift(norm, x)
    d = x - per_map(shift)
    autograd = eager_autograd(x)
    m, square = _SampleMoments.apply(d) if autograd else _sample_moments(d)
    u = m + shift  # GAP(x), the LSTM input
    if eval_bn:
        offset, invstd = m.new_zeros(()), torch.rsqrt(norm.running_var + norm.eps)
    else:
        offset, invstd = _offset_invstd(norm, m, square, shift, H * W)
    h, c = lstm_step(u)
    scale = h * invstd
    bias = torch.addcmul(c, offset, scale, value=-1)
    if scale.dtype != x.dtype:  # autocast: y in x's dtype, as the norm gives
        scale, bias = scale.to(x.dtype), bias.to(x.dtype)
    if autograd:
        return _Affine.apply(d, scale, bias)
    # mul then add_: on CPU a broadcasting addcmul is several times slower than the two; in place on d
    # only when no graph keeps d for a backward
    y = torch.mul(d, per_map(scale)) if torch.is_grad_enabled() else d.mul_(per_map(scale))
    return y.add_(per_map(bias))


def standardize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) through the standardizer's own kernel, with x shifted by a value read from x that the output
    does not depend on (per channel for BN in training, per sample and group for GN, per sample and channel
    for IN): the kernels' float32 statistics lose precision when the mean is large against the spread."""
    kind = type(norm)
    if kind is nn.BatchNorm2d and norm.training and x.shape[0] * x.shape[2] * x.shape[3] > 1:
        shift = per_map(_shift(norm, x, only_if_far=True))
        if not norm.track_running_stats:
            return norm(x - shift)
        # what BatchNorm2d.forward does, with the running mean tracked in the shifted frame
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            running_mean = norm.running_mean - shift.flatten().to(norm.running_mean.dtype)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        y = F.batch_norm(x - shift, running_mean, norm.running_var, None, None, True, factor, norm.eps)
        with torch.no_grad():
            norm.running_mean.copy_(running_mean + shift.flatten())
        return y
    if kind is nn.GroupNorm or (kind is nn.InstanceNorm2d and not norm.track_running_stats):
        return norm(x - per_map(_shift(norm, x, only_if_far=True)))
    return norm(x)


def _shift(norm: nn.Module, x: torch.Tensor, only_if_far: bool = False) -> torch.Tensor:
    """A cheap estimate of the standardizer's mean, constant where its statistics are taken: the mean of the
    first row of every feature map, per channel (BN, (1, C)), per sample and group (GN) or per sample and
    channel (IN, (N, C)). Any value near the mean serves; a row is steadier than a single element.

    ``only_if_far``: zero where every row's mean is within FAR_MEAN_OVER_STD of its spread, where the
    kernels' own statistics are exact to float32 rounding already and an unshifted input keeps their results."""
    with torch.no_grad():
        rows = x[:, :, 0, :].float()
        mean = rows.mean(dim=2)
        far = mean.abs() > FAR_MEAN_OVER_STD * rows.std(dim=2, correction=0) if only_if_far else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            mean = mean.mean(dim=0, keepdim=True)
            far = far.any(dim=0, keepdim=True) if only_if_far else None
        elif isinstance(norm, nn.GroupNorm):
            N, C = mean.shape
            G = norm.num_groups
            mean = _per_channel(mean.view(N, G, C // G).mean(dim=2), C)
            far = _per_channel(far.view(N, G, C // G).any(dim=2), C) if only_if_far else None
        if only_if_far:
            mean = torch.where(far, mean, 0.0)
        return mean.to(x.dtype)


def _offset_invstd(norm: nn.Module, m: torch.Tensor, square: torch.Tensor, shift: torch.Tensor,
                   hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu - s, 1/sigma) of the standardizer from the shifted per-(sample, channel) moments, each (N, C) or (C,).
    Batch norms in training update their running statistics here, as F.batch_norm does."""
    N, C = m.shape
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if N * hw == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {(N, C, hw)}")
        offset = m.mean(0)
        var = (square.mean(0) - offset * offset).clamp_min(0)  # clamp: rounding may leave a tiny negative
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, shift[0] + offset, var, N * hw)
        return offset, torch.rsqrt(var + norm.eps)
    if isinstance(norm, nn.GroupNorm):
        G = norm.num_groups
        offset = m.view(N, G, C // G).mean(2)
        var = (square.view(N, G, C // G).mean(2) - offset * offset).clamp_min(0)
        return _per_channel(offset, C), _per_channel(torch.rsqrt(var + norm.eps), C)
    return m, torch.rsqrt((square - m * m).clamp_min(0) + norm.eps)  # instance norm


def _sample_moments(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square over (H, W) of every (sample, channel), each (N, C)."""
    return d.mean(dim=(2, 3)), _sum_of_products(d, d) / (d.shape[2] * d.shape[3])


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over (H, W) of a * b, (N, C), without materializing a * b where the layout allows."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))
    return (a * b).sum(dim=(2, 3))  # e.g. channels-last: flatten(2) would copy both


class _SampleMoments(torch.autograd.Function):
    """:func:`_sample_moments` with a one-pass backward: dd = dm / HW + d * 2 dq / HW."""

    @staticmethod
    def forward(ctx, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(d)
        return _sample_moments(d)

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_square: torch.Tensor | None) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        count = d.shape[2] * d.shape[3]
        grad = per_map(grad_mean / count) if grad_mean is not None else d.new_zeros(())
        if grad_square is None:
            return grad.expand_as(d).clone(memory_format=torch.preserve_format)
        return torch.mul(d, per_map(grad_square * (2 / count))).add_(grad)


class _Affine(torch.autograd.Function):
    """y = d * scale + bias with per-(sample, channel) scale and bias; the backward reads the gradient
    and d once each instead of materializing grad * d."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d, scale)
        return torch.mul(d, per_map(scale)).add_(per_map(bias))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, scale = ctx.saved_tensors
        return grad * per_map(scale), _sum_of_products(grad, d), grad.sum(dim=(2, 3))


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
