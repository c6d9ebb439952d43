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
        h, c = (None, None) if state is None else state
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
                t is not None and t.requires_grad for t in (u, h, c, w0, b0, w1, b1)):
            return _CellStep.apply(u, h, c, w0, b0, w1, b1)
        return _cell_step(u, h, c, w0, b0, w1, b1)[:2]

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

    def gate_parameters(self) -> tuple[torch.Tensor, ...]:
        """(W0, b0, W1, b1) of input_map, then of hidden_map: what the CPU kernel (cpu_kernel.py) takes."""
        input_map, hidden_map = self._modules["input_map"]._modules, self._modules["hidden_map"]._modules
        linears = (input_map["0"], input_map["2"], hidden_map["0"], hidden_map["2"])
        try:  # from the modules' dicts: Module.__getattr__ costs a microsecond a name
            return tuple(p for linear in linears for p in (linear._parameters["weight"], linear._parameters["bias"]))
        except KeyError:  # a parametrized weight (torch.nn.utils.parametrize) is computed by its property
            return tuple(p for linear in linears for p in (linear.weight, linear.bias))

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


def _cell_step(u: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None, w0: torch.Tensor, b0: torch.Tensor,
               w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h', c') and what the backward needs: the bottleneck's activations r = relu(z), the gate activations,
    sigmoid(c')."""
    C = u.shape[1]
    if h is None:  # zero state: [u, 0] @ W0 reads only W0's first C rows, and f * 0 drops out
        z = torch.addmm(b0, u, w0.narrow(0, 0, C))
    else:
        z = torch.addmm(b0, torch.cat([u, h], dim=1), w0)
    r = torch.relu(z)
    gates = torch.addmm(b1, r, w1)
    s = torch.sigmoid(gates)  # the g quarter is unused; one kernel over all four beats three slices
    i, f, _, o = s.chunk(4, dim=1)  # one call for the four views: indexing costs microseconds each
    g = torch.tanh(gates.narrow(1, 2 * C, C))
    c_new = i * g if c is None else torch.addcmul(f * c, i, g)
    squashed = torch.sigmoid(c_new)
    return o * squashed, c_new, r, s, g, squashed


class _CellStep(torch.autograd.Function):
    """:func:`_cell_step` as one autograd node: at small batch an eager step costs per node, not per FLOP,
    and the written-out step records about twenty (four gate slices each back-propagate a zero-filled copy)."""

    @staticmethod
    def forward(ctx, u, h, c, w0, b0, w1, b1):
        h_new, c_new, r, s, g, squashed = _cell_step(u, h, c, w0, b0, w1, b1)
        ctx.save_for_backward(u, h, c, w0, w1, r, s, g, squashed)
        return h_new, c_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_c):
        u, h, c, w0, w1, r, s, g, squashed = ctx.saved_tensors
        C = u.shape[1]
        i, f, _, o = s.chunk(4, dim=1)
        aten = torch.ops.aten  # the activations' own backward kernels: one call each instead of three or four
        # c' -> h' = o * sigmoid(c'): dc' += dh' * o * sigmoid'(c')
        grad_c = torch.addcmul(grad_c, aten.sigmoid_backward(grad_h, squashed), o)
        # the gates' gradients before their nonlinearities, all four quarters in a few whole-width ops
        upstream = torch.cat([grad_c * g, grad_c * c if c is not None else torch.zeros_like(grad_c),
                              grad_c * i, grad_h * squashed], dim=1)
        grad_gates = aten.sigmoid_backward(upstream, s)
        aten.tanh_backward.grad_input(upstream.narrow(1, 2 * C, C), g, grad_input=grad_gates.narrow(1, 2 * C, C))
        grad_z = aten.threshold_backward(grad_gates @ w1.t(), r, 0)
        hu = u if h is None else torch.cat([u, h], dim=1)
        w0_used = w0.narrow(0, 0, C) if h is None else w0
        grad_hu = grad_z @ w0_used.t()
        grad_w0 = hu.t() @ grad_z
        if h is None:
            grad_w0 = torch.cat([grad_w0, grad_w0.new_zeros(w0.shape[0] - C, w0.shape[1])])
        return (grad_hu[:, :C], None if h is None else grad_hu[:, C:], None if c is None else grad_c * f,
                grad_w0, grad_z.sum(0), r.t() @ grad_gates, grad_gates.sum(0))
