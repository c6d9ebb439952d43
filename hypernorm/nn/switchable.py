"""Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization",
ICLR 2019): the mean and variance are mixtures of instance-, layer- and batch-norm statistics, with learned
softmax weights (one set for the means, one for the variances)."""
from __future__ import annotations

import torch
from torch import nn

from .norms import register_norm
from .replace import copy_norm_state

__all__ = ["SwitchableNorm2d"]


class SwitchableNorm2d(nn.Module):
    r"""y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta over (N, C, H, W) feature maps, with

    mu = sum_k softmax(w_mean)_k mu_k,  sigma^2 = sum_k softmax(w_var)_k sigma^2_k,  k in {IN, LN, BN}

    mu_IN, sigma^2_IN are taken per sample and channel over (H, W); LN and BN are derived from them
    (LN averages over channels, BN over the batch), with sigma^2 = E[x^2] - mu^2 and biased variances,
    as in the paper's Eq. (3)-(5). In training the BN statistics come from the batch and update moving
    averages (``momentum`` in PyTorch's convention: new = (1 - m) * old + m * batch); in eval those moving
    averages replace them, so a sample's output does not depend on its batch.

    Args:
        num_features: channels C.
        eps: added to the variance.
        momentum: moving-average factor of the BN statistics.
        affine: learn gamma, beta per channel. HyperNorm's standardizer ("shn") uses ``affine=False``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"SwitchableNorm2d needs num_features >= 1, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # Importance logits of (IN, LN, BN); equal at the start, as in the paper.
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"SwitchableNorm2d: expected input of shape (N, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        var_in, mean_in = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)  # (N, C, 1, 1)
        square_in = var_in + mean_in.square()  # E[x^2] per sample and channel
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = square_in.mean(1, keepdim=True) - mean_ln.square()
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = square_in.mean(0, keepdim=True) - mean_bn.square()
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.flatten(), self.momentum)
                self.running_var.lerp_(var_bn.flatten(), self.momentum)
        else:
            mean_bn = self.running_mean.view(1, -1, 1, 1)
            var_bn = self.running_var.view(1, -1, 1, 1)
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = torch.addcmul(self.bias.view(1, -1, 1, 1), out, self.weight.view(1, -1, 1, 1))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


def _strip_switchable(norm: SwitchableNorm2d) -> SwitchableNorm2d:
    """An affine-free copy keeping the learned mixture and the moving averages (for ``convert(norm="hn")``)."""
    copy = SwitchableNorm2d(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=False)
    return copy_norm_state(norm, copy.to(norm.mean_weight.device))


register_norm("sn", SwitchableNorm2d, lambda c, affine: SwitchableNorm2d(c, affine=affine), _strip_switchable)
