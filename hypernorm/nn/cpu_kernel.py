"""HyperNorm over BatchNorm on the CPU as one C++ kernel (csrc/batchnorm_cpu.cpp), built on first use.

At small batch an eager HyperNorm layer costs its number of operator calls: the Python fused path makes about a
hundred per layer and training step, each a microsecond or more of dispatch, and records three autograd nodes.
The kernel's forward is one call of vectorized loops (ATen's ``Vectorized<float>``, compiled for the machine's CPU
capability): one pass for the statistics, the LSTM step, one pass for the affine. Its backward is one call too:
one pass for the per-map sums, the LSTM step's backward (ATen's operators), one pass for the input's gradient. The
layer is one autograd node.

It takes an eager, float32, contiguous NCHW input to a BatchNorm standardizer on the CPU; everything else (GPU,
torch.compile, autocast, channels-last, other norms, a mean far from its spread) takes the paths of
:mod:`hypernorm.nn.fused`. The kernel is compiled once per machine, torch version and CPU capability with the C++
compiler torch.compile also uses (torch.utils.cpp_extension caches it); without one the layer warns once and runs
the Python paths, which give the same numbers; ``HYPERNORM_CPU_KERNEL=0`` in the environment skips the kernel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .fused import FAR_MEAN_OVER_STD, autocast_enabled, check_batch_statistics, is_local_batchnorm

__all__ = ["ENABLED", "available", "applies", "applies_to_norm", "batchnorm_forward", "build", "load",
           "output_weights"]

SOURCE = Path(__file__).with_name("csrc") / "batchnorm_cpu.cpp"
# False: the Python paths everywhere (the environment variable sets it for a process; tests switch it)
ENABLED = os.environ.get("HYPERNORM_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")

ANNOUNCE_AFTER_S = 2.0  # a build still running after this long is announced
_kernel: ModuleType | None = None
_failure: str | None = None


def load() -> ModuleType | None:
    """The compiled kernel, built on the first call (about a minute, once per machine, torch version and CPU
    capability); None, with one warning, where it cannot be built."""
    global _kernel, _failure
    if _kernel is None and _failure is None:
        try:
            capability, _ = _instruction_set()
            with _announce_if_slow(f"hypernorm: compiling the C++ CPU kernel for {capability} (once per machine "
                                   "and torch version, about a minute; HYPERNORM_CPU_KERNEL=0 skips it)"):
                _kernel = build(SOURCE, "hypernorm_batchnorm_cpu")
        except Exception as error:  # no compiler, no headers, a read-only cache: the Python paths serve
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(f"hypernorm: the C++ CPU kernel could not be built ({_failure}); HyperNorm layers run "
                          "their Python paths (same results, slower at small batch). Set HYPERNORM_CPU_KERNEL=0 "
                          "to skip the build.", RuntimeWarning, stacklevel=2)
    return _kernel


def build(source: Path, name: str) -> ModuleType:
    """``source`` compiled as the kernel is, for this machine's CPU capability, as the module ``name``_<capability>
    (torch.utils.cpp_extension caches it; a changed source is built again). Raises where it cannot be built.
    benchmarks/kernel_ab.py builds another version of the kernel's source with it."""
    with _quiet_import_of("torch.utils.cpp_extension"):  # "No CUDA runtime is found" on a CPU-only torch
        from torch.utils import cpp_extension

    capability, flags = _instruction_set()
    return cpp_extension.load(name=f"{name}_{capability.lower()}", sources=[str(source)],
                              extra_cflags=["-O3", *flags], verbose=False)


# ATen's own flags for the vector code of each CPU capability (at::vec::Vectorized takes its width from them)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _instruction_set() -> tuple[str, list[str]]:
    """The CPU capability torch's own kernels run with here (``ATEN_CPU_CAPABILITY`` lowers it) and the compiler
    flags of a build for it; the build's name carries the capability, so a cache shared by different machines
    never hands one a build for instructions it lacks."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in _CAPABILITY_FLAGS:
        return "default", []
    return capability, [*_CAPABILITY_FLAGS[capability], f"-DCPU_CAPABILITY={capability}",
                        f"-DCPU_CAPABILITY_{capability}"]


@contextlib.contextmanager
def _announce_if_slow(message: str):
    """Log ``message`` (a warning: shown by default) if the block is still running after ANNOUNCE_AFTER_S seconds:
    a cached build loads in well under a second, a fresh one pauses the first forward pass for about a minute."""
    timer = threading.Timer(ANNOUNCE_AFTER_S, logging.getLogger(__name__).warning, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
    running_mean = norm._buffers.get("running_mean")
    return not autocast_enabled("cpu") and (running_mean is None or running_mean.dtype == torch.float32)


def output_weights(parameters: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The LSTM's output layers as :func:`batchnorm_forward` reads them (None without a kernel): build once per
    stage and pass, since a stage's layers share the LSTM."""
    kernel = load()
    return None if kernel is None or parameters[0].dtype != torch.float32 else kernel.output_weights(parameters)


def batchnorm_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                      state: tuple[torch.Tensor, torch.Tensor] | None, parameters: tuple[torch.Tensor, ...],
                      out_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(y, h, c) of HyperNorm over ``norm`` with the LSTM's ``parameters`` (TrimmedLSTMCell.gate_parameters()) and
    ``out_weights`` (:func:`output_weights` of them: None exactly where there is no kernel for them), or None, state
    untouched, where the Python paths must serve: no kernel, or a mean far from its spread. Moves the running
    statistics as BatchNorm does."""
    kernel = load()
    if kernel is None or out_weights is None:  # no kernel, or not float32 parameters (the kernel checks all eight)
        return None
    buffers = norm._buffers  # Module.__getattr__ costs a microsecond a name
    running_mean, running_var, tracked = buffers.get("running_mean"), buffers.get("running_var"), None
    batch_stats = norm.training or running_mean is None
    if batch_stats:
        check_batch_statistics(x)
        if norm.training and norm.track_running_stats:
            tracked = buffers.get("num_batches_tracked")
        else:
            running_mean = running_var = None
    h0, c0 = (None, None) if state is None else state
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or parameters[0].requires_grad
        or any(t is not None and t.requires_grad for t in (h0, c0, *parameters[1:])))
    out = kernel.forward(x, batch_stats, norm.eps, FAR_MEAN_OVER_STD, running_mean, running_var, tracked,
                         -1.0 if norm.momentum is None else norm.momentum, h0, c0, parameters,  # -1: cumulative
                         out_weights, differentiable)
    if not out:
        return None
    return _Layer.apply(x, h0, c0, out, batch_stats, *parameters) if differentiable else tuple(out)


class _Layer(torch.autograd.Function):
    """The kernel's forward (computed before, without autograd, and passed in ``out``) and backward as one autograd
    node: inputs x, the relayed (h0, c0) and the eight parameters of the LSTM's gate maps; outputs y and the
    (h, c) handed to the next block."""

    @staticmethod
    def forward(ctx, x, h0, c0, out, batch_stats, *parameters):
        y, h, c, u, mean, invstd, r, s, g, squashed = out
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
        return (grad_x, grad_h0, grad_c0, None, None, *grad_parameters)
