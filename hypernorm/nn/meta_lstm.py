"""The trimmed meta LSTM that generates HyperNorm's per-sample scale and shift."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BottleneckMLP", "TrimmedLSTMCell"]


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
        self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
