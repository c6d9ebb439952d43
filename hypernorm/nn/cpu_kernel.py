"""HyperNorm over BatchNorm on the CPU as one C++ kernel (csrc/batchnorm_cpu.cpp), built on first use.

At small batch an eager HyperNorm layer costs its number of operator calls: the Python fused path makes about a
hundred per layer and training step, each a microsecond or more of dispatch. The kernel does the same work in
two passes over x each way, as BatchNorm's own kernel, with the small (N, C) work in C++ between them.

It takes an eager, float32, contiguous NCHW input to a BatchNorm standardizer on the CPU; everything else (GPU,
torch.compile, autocast, channels-last, other norms, a mean far from its spread) takes the paths of
:mod:`hypernorm.nn.fused`. The kernel is compiled once per machine and torch version with the C++ compiler
torch.compile also uses (torch.utils.cpp_extension caches it); without one, or with ``HYPERNORM_CPU_KERNEL=0``
in the environment, the layer warns once and runs the Python paths, which give the same numbers.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .fused import FAR_MEAN_OVER_STD, _is_eval_bn, _running_statistics, _update_running_stats, autocast_enabled
from .sync_batchnorm import CPUSyncBatchNorm

__all__ = ["ENABLED", "available", "applies", "batchnorm_forward", "load"]

SOURCE = Path(__file__).with_name("csrc") / "batchnorm_cpu.cpp"
# False: the Python paths everywhere (the environment variable sets it for a process; tests switch it)
ENABLED = os.environ.get("HYPERNORM_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")

_kernel: ModuleType | None = None
_failure: str | None = None


def load() -> ModuleType | None:
    """The compiled kernel, built on the first call (about a minute, once per machine and torch version);
    None, with one warning, where it cannot be built."""
    global _kernel, _failure
    if _kernel is None and _failure is None:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        try:
            from torch.utils import cpp_extension

            _kernel = cpp_extension.load(name="hypernorm_batchnorm_cpu", sources=[str(SOURCE)],
                                         extra_cflags=["-O3"], verbose=False)
        except Exception as error:  # no compiler, no headers, a read-only cache: the Python paths serve
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(f"hypernorm: the C++ CPU kernel could not be built ({_failure}); HyperNorm layers run "
                          "their Python paths (same results, slower at small batch). Set HYPERNORM_CPU_KERNEL=0 "
                          "to skip the build.", RuntimeWarning, stacklevel=2)
    return _kernel


def available() -> bool:
    """Whether the kernel is enabled and builds (building it if needed)."""
    return ENABLED and load() is not None


def applies(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel computes HyperNorm over ``norm`` for input ``x`` (before it is built or refused)."""
    if not ENABLED or _failure is not None:
        return False
    kind = type(norm)
    if not (kind is nn.BatchNorm2d or (kind in (nn.SyncBatchNorm, CPUSyncBatchNorm) and not norm.training
                                       and norm.track_running_stats)):
        return False
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32 or x.dim() != 4 \
            or not x.is_contiguous() or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False  # a dispatch mode (FLOP counter, fake tensors) must see every operator: no raw loops
    return not autocast_enabled("cpu") and (norm.running_mean is None or norm.running_mean.dtype == torch.float32)

def batchnorm_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                      state: tuple[torch.Tensor, torch.Tensor] | None,
                      weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(y, h, c) of HyperNorm over ``norm``, or None (state untouched) where the Python paths must serve: no
    kernel, or a mean far from its spread. Updates the running statistics as BatchNorm does."""
    kernel = load()
    if kernel is None or any(w.dtype != torch.float32 for w in weights):
        return None
    N, C, H, W = x.shape
    batch_stats = not _is_eval_bn(norm)
    if batch_stats:
        if N * H * W == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        u, mean, var, invstd, far = kernel.batch_statistics(x, norm.eps, FAR_MEAN_OVER_STD)
        if far:
            return None
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean, var, N * H * W)
    else:
        mean, invstd, far = _running_statistics(norm)
        if far:
            return None
        u = x.mean(dim=(2, 3))
    h0, c0 = (None, None) if state is None else state
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h0, c0, *weights)):
        return _Layer.apply(x, h0, c0, *weights, u, mean, invstd, batch_stats)
    return tuple(kernel.forward(x, u, mean, invstd, h0, c0, *weights)[:3])


class _Layer(torch.autograd.Function):
    """The kernel's forward and backward as one autograd node: inputs x, the relayed (h0, c0) and the stage's
    fused LSTM weights; outputs y and the (h, c) handed to the next block."""

    @staticmethod
    def forward(ctx, x, h0, c0, w0, b0, w1, b1, u, mean, invstd, batch_stats):
        y, h, c, r, s, g, squashed = _kernel.forward(x, u, mean, invstd, h0, c0, w0, b0, w1, b1)
        ctx.save_for_backward(x, h0, c0, w0, w1, u, mean, invstd, h, r, s, g, squashed)
        ctx.batch_stats = batch_stats
        return y, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h, grad_c):
        x, h0, c0, w0, w1, u, mean, invstd, h, r, s, g, squashed = ctx.saved_tensors
        grad_x, grad_h0, grad_c0, grad_w0, grad_b0, grad_w1, grad_b1 = _kernel.backward(
            grad_y, grad_h, grad_c, x, u, mean, invstd, h0, c0, w0, w1, h, r, s, g, squashed, ctx.batch_stats,
            ctx.needs_input_grad[0])
        return grad_x, grad_h0, grad_c0, grad_w0, grad_b0, grad_w1, grad_b1, None, None, None, None
