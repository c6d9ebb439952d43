"""HyperNorm: standardize with a wrapped norm, then apply a per-sample affine from a relayed meta LSTM."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .meta_lstm import TrimmedLSTMCell
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.name}: expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}"
            )
        relay = self.relay
        h, c = relay.cell(x.mean(dim=(2, 3)), None if self.starts_stage else relay.state)
        relay.state = None if self.ends_stage else (h, c)
        return torch.addcmul(c[:, :, None, None], self.norm(x), h[:, :, None, None])

    def _follow(self, relay: StageRelay) -> None:
        """Use ``relay`` without registering it: the stage's first layer owns it in the state_dict."""
        if "relay" in self._modules:
            del self._modules["relay"]
        object.__setattr__(self, "relay", relay)
        self.starts_stage = False

    def extra_repr(self) -> str:
        role = "owns the stage LSTM" if self.starts_stage else "relays the stage LSTM"
        return f"{self.num_features}, {role}, ends_stage={self.ends_stage}"


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
