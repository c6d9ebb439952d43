"""HyperNorm over BatchNorm on the CPU as one C++ kernel (csrc/batchnorm_cpu.cpp), built on first use.

At small batch an eager HyperNorm layer costs its number of operator calls: the Python fused path makes about a
hundred per layer and training step, each a microsecond or more of dispatch, and records three autograd nodes.
The kernel makes the same full-size passes over x (the same ATen kernels) with the small (N, C) work in C++
between them, as one call each way and one autograd node.

It takes an eager, float32, contiguous NCHW input to a BatchNorm standardizer on the CPU; everything else (GPU,
torch.compile, autocast, channels-last, other norms, a mean far from its spread) takes the paths of
:mod:`hypernorm.nn.fused`. The kernel is compiled once per machine and torch version with the C++ compiler
torch.compile also uses (torch.utils.cpp_extension caches it); without one the layer warns once and runs the
Python paths, which give the same numbers; ``HYPERNORM_CPU_KERNEL=0`` in the environment skips the kernel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .fused import (FAR_MEAN_OVER_STD, _is_eval_bn, _running_statistics, autocast_enabled, check_batch_statistics,
                    is_local_batchnorm)

__all__ = ["ENABLED", "available", "applies", "applies_to_norm", "batchnorm_forward", "load"]

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
        try:
            with _quiet_import_of("torch.utils.cpp_extension"):  # "No CUDA runtime is found" on a CPU-only torch
                from torch.utils import cpp_extension

            _kernel = cpp_extension.load(name="hypernorm_batchnorm_cpu", sources=[str(SOURCE)],
                                         extra_cflags=["-O3"], verbose=False)
        except Exception as error:  # no compiler, no headers, a read-only cache: the Python paths serve
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(f"hypernorm: the C++ CPU kernel could not be built ({_failure}); HyperNorm layers run "
                          "their Python paths (same results, slower at small batch). Set HYPERNORM_CPU_KERNEL=0 "
                          "to skip the build.", RuntimeWarning, stacklevel=2)
    return _kernel


@contextlib.contextmanager
def _quiet_import_of(logger_name: str):
    """Warnings that a module logs while it is imported are dropped; its logger's level is restored after."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def available() -> bool:
    """Whether the kernel is enabled and builds (building it if needed)."""
    return ENABLED and load() is not None


def applies_to_norm(norm: nn.Module) -> bool:
    """Whether the kernel computes HyperNorm over the standardizer ``norm`` (in its present train/eval mode)."""
    return is_local_batchnorm(norm)


def applies(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel computes HyperNorm over ``norm`` for input ``x`` (before it is built or refused)."""
    if not ENABLED or _failure is not None or not applies_to_norm(norm):
        return False
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32 or x.dim() != 4 \
            or not x.is_contiguous() or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._get_tracing_state() is not None or torch._C._functorch.peek_interpreter_stack() is not None:
        return False  # compilers, exporters, tracers, dispatch modes (FLOP counter, fake tensors) and torch.func
        # transforms must see every operator: the kernel reads and writes tensors' memory directly
    return not autocast_enabled("cpu") and (norm.running_mean is None or norm.running_mean.dtype == torch.float32)


def batchnorm_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                      state: tuple[torch.Tensor, torch.Tensor] | None,
                      parameters: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(y, h, c) of HyperNorm over ``norm`` with the LSTM's ``parameters`` (TrimmedLSTMCell.gate_parameters()), or
    None, state untouched, where the Python paths must serve: no kernel, or a mean far from its spread. Moves the
    running statistics as BatchNorm does."""
    kernel = load()
    if kernel is None or any(p.dtype != torch.float32 for p in parameters):
        return None
    # The output before the small temporaries: allocated after them it lands at the top of glibc's heap, goes
    # back to the system when freed and faults in again next step (the "nothing set" cost of issue 14).
    y = torch.empty_like(x)
    batch_stats = not _is_eval_bn(norm)
    if batch_stats:
        check_batch_statistics(x)
        track = norm.training and norm.track_running_stats
        momentum = -1.0 if norm.momentum is None else norm.momentum  # -1: the cumulative average
        u, mean, invstd, far = kernel.batch_statistics(
            x, norm.eps, FAR_MEAN_OVER_STD, norm.running_mean if track else None,
            norm.running_var if track else None, norm.num_batches_tracked if track else None, momentum)
    else:
        u = None  # the kernel's forward takes the GAP
        mean, invstd, far = _running_statistics(norm)
    if far:
        return None
    h0, c0 = (None, None) if state is None else state
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h0, c0, *parameters)):
        return _Layer.apply(x, (y,), h0, c0, u, mean, invstd, batch_stats, *parameters)  # y in a tuple: a
        # buffer to write, not an input whose gradient autograd would track
    return tuple(kernel.forward(x, y, u, mean, invstd, h0, c0, parameters)[:3])


class _Layer(torch.autograd.Function):
    """The kernel's forward and backward as one autograd node: inputs x, the relayed (h0, c0) and the eight
    parameters of the LSTM's gate maps; outputs y and the (h, c) handed to the next block."""

    @staticmethod
    def forward(ctx, x, out, h0, c0, u, mean, invstd, batch_stats, *parameters):
        y, h, c, u, r, s, g, squashed = _kernel.forward(x, out[0], u, mean, invstd, h0, c0, parameters)
        ctx.save_for_backward(x, h0, c0, u, mean, invstd, h, r, s, g, squashed, *parameters)
        ctx.batch_stats = batch_stats
        return y, h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h, grad_c):
        x, h0, c0, u, mean, invstd, h, r, s, g, squashed, *parameters = ctx.saved_tensors
        grad_x, grad_h0, grad_c0, *grad_parameters = _kernel.backward(
            grad_y, grad_h, grad_c, x, u, mean, invstd, h0, c0, parameters, h, r, s, g, squashed, ctx.batch_stats,
            ctx.needs_input_grad[0])
        return (grad_x, None, grad_h0, grad_c0, None, None, None, None, *grad_parameters)
