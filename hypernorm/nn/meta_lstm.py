"""The trimmed meta LSTM that generates HyperNorm's per-sample scale and shift."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BottleneckMLP", "TrimmedLSTMCell"]

FusedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class BottleneckMLP(nn.Sequential):
    """v = W1 relu(W0 u): the paper's bottleneck replacement for an LSTM's dense gate map."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, out_features),
        )


class TrimmedLSTMCell(nn.Module):
    """LSTM cell whose gate maps are bottleneck MLPs and whose output squashes with a sigmoid.

    gates = input_map(u) + hidden_map(h);  i, f, o = sigmoid, g = tanh
    c' = f * c + i * g;                    h' = o * sigmoid(c')      (h' in (0, 1))

    With ``channels = C`` and ``reduction = r`` each map is Linear(C, C/r) -> ReLU -> Linear(C/r, 4C),
    which is the size that reproduces the parameter counts of the paper's Table 3.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"TrimmedLSTMCell needs channels >= 1 and reduction >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.reduction = reduction
        self.input_map = BottleneckMLP(channels, hidden, 4 * channels)
        self.hidden_map = BottleneckMLP(channels, hidden, 4 * channels)

    def forward(
        self,
        u: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        weights: FusedWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: (h, c) for input ``u`` (N, C) and the previous ``state`` (zeros when None).

        Runs both gate maps as two GEMMs (see :meth:`fused_weights`); pass ``weights`` to reuse them for
        every step of one forward pass. :meth:`forward_reference` is the same step written out.
        """
        w0, b0, w1, b1 = self.fused_weights() if weights is None else weights
        C = self.channels
        if state is None:
            h = c = None
            hu = torch.cat([u, u.new_zeros(u.shape)], dim=1)
        else:
            h, c = state
            hu = torch.cat([u, h], dim=1)
        # [u, h] @ blockdiag(W0_in, W0_hid)^T = [W0_in u, W0_hid h]; then W1_in r_u + W1_hid r_h in one GEMM
        gates = torch.addmm(b1, torch.relu(torch.addmm(b0, hu, w0)), w1)
        s = torch.sigmoid(gates)  # the g quarter is unused; one kernel over all four beats three slices
        i, f, o = s[:, :C], s[:, C:2 * C], s[:, 3 * C:]
        g = torch.tanh(gates[:, 2 * C:3 * C])
        c = i * g if c is None else torch.addcmul(f * c, i, g)  # f * 0 dropped on a zero state
        return o * torch.sigmoid(c), c

    def fused_weights(self) -> FusedWeights:
        """(W0, b0, W1, b1) such that gates = relu([u, h] @ W0 + b0) @ W1 + b1 equals
        input_map(u) + hidden_map(h) (weights stored transposed, ready for addmm). Differentiable:
        gradients reach the four Linear layers."""
        first_in, second_in = self.input_map[0], self.input_map[2]
        first_hid, second_hid = self.hidden_map[0], self.hidden_map[2]
        w0 = torch.block_diag(first_in.weight, first_hid.weight)
        b0 = torch.cat([first_in.bias, first_hid.bias])
        w1 = torch.cat([second_in.weight, second_hid.weight], dim=1)
        return w0.t(), b0, w1.t(), second_in.bias + second_hid.bias

    def forward_reference(
        self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step as the equations read; :meth:`forward` computes the same with fewer, larger GEMMs."""
        if state is None:
            zeros = u.new_zeros(u.shape[0], self.channels)
            state = (zeros, zeros)
        h, c = state
        gates = self.input_map(u) + self.hidden_map(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.sigmoid(c)
        return h, c

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"
