"""SyncBatchNorm on CPU processes (gloo). torch's SyncBatchNorm only syncs CUDA tensors and refuses CPU input
once a process group exists; this subclass computes the same global-batch statistics with differentiable
all-reduces, so SyncBN/SyncBHN runs (and can be tested) under torchrun on CPU. On CUDA torch's own kernel runs.
It is not a subclass of nn.SyncBatchNorm because DDP refuses those on CPU; its state_dict keys are the same."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .replace import copy_norm_state, replace_module

__all__ = ["CPUSyncBatchNorm", "use_cpu_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each process's input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are over the whole batch of all processes of ``process_group``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)  # no group, or eval: plain batch norm with running statistics
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        # Two passes (mean, then squared deviations), as in a plain BN, for the same precision.
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = totals[-1]
        if n.item() < 2:
            raise ValueError("SyncBatchNorm needs at least 2 values per channel over all processes in training")
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1), factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def use_cpu_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` of ``model`` (in place) by :class:`CPUSyncBatchNorm`, keeping its state.
    For CPU processes; the model's state_dict keys do not change."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.SyncBatchNorm:
            continue
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, module.process_group)
        replace_module(model, name, copy_norm_state(module, new, affine=True))
    return model
