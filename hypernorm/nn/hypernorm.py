"""HyperNorm: standardize with a wrapped norm, then apply a per-sample affine from a relayed meta LSTM."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from . import cpu_kernel
from . import fused as fused_kernels
from .fused import autocast_enabled, per_map
from .meta_lstm import FusedWeights, TrimmedLSTMCell
from .norms import create_base_norm

if TYPE_CHECKING:
    from .diagnostics import RelayStats

__all__ = ["StageRelay", "HyperNorm", "share_relay", "set_fused"]


class StageRelay(nn.Module):
    """The meta LSTM of one network stage and the (h, c) it relays from block to block.

    ``state`` and ``weights`` are transient: the stage's first HyperNorm clears them before its step and
    the last one after, whichever path each takes, so nothing survives from one forward pass to the next.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.cell = TrimmedLSTMCell(channels, reduction)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.weights: FusedWeights | None = None  # the cell's fused GEMM weights, built once per pass
        self.kernel_weights: torch.Tensor | None = None  # the CPU kernel's layout of them, built once per pass
        self.parameters_of_pass: tuple[torch.Tensor, ...] | None = None  # the cell's gate_parameters(), once per pass

    @property
    def channels(self) -> int:
        return self.cell.channels

    # Every layer of every pass writes these; Module.__setattr__ (which sorts parameters, buffers and submodules)
    # would cost microseconds a write, so they go straight to the instance dict.
    def reset(self) -> None:
        """Forget the relayed state and what this pass read or built from the LSTM's parameters."""
        self.__dict__.update(state=None, weights=None, kernel_weights=None, parameters_of_pass=None)

    def hand_on(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.__dict__["state"] = state

    def pass_weights(self) -> FusedWeights:
        """The cell's fused GEMM weights, built by the first layer of the pass that needs them."""
        if self.weights is None:
            self.__dict__["weights"] = self.cell.fused_weights()
        return self.weights

    def pass_parameters(self) -> tuple[torch.Tensor, ...]:
        """The cell's :meth:`~TrimmedLSTMCell.gate_parameters`, read by the first layer of the pass."""
        if self.parameters_of_pass is None:
            self.__dict__["parameters_of_pass"] = self.cell.gate_parameters()
        return self.parameters_of_pass

    def pass_kernel_weights(self, parameters: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """:func:`cpu_kernel.output_weights` of the cell's ``parameters``, built by the first layer of the pass."""
        if self.kernel_weights is None:
            self.__dict__["kernel_weights"] = cpu_kernel.output_weights(parameters)
        return self.kernel_weights


class HyperNorm(nn.Module):
    """y = h * norm(x) + c, with (h, c) = LSTM(GAP(x), state relayed from the previous block).

    Args:
        num_features: channels C of the (N, C, H, W) input.
        norm: the standardizer, as a registered name ("bn", "syncbn", "gn", "in", "ln", "sn") or a
            module without affine parameters (its running statistics and train/eval behaviour are kept).
        reduction: bottleneck ratio r of the LSTM's gate maps, Linear(C, C/r) -> ReLU -> Linear(C/r, 4C).
        name: shown in error messages; :func:`hypernorm.convert` sets the qualified module name.
        channels_last: the input is (N, ..., C), channels last (ConvNeXt, Swin) or tokens (ViT), and ``norm``
            normalizes its last dim (a LayerNorm): GAP is the mean over the dims between N and C.
        relayed: False starts the LSTM step from zero state at every block (the "no-relay" ablation,
            norm names ending in "_norelay"): the same shared LSTM and parameters, only the relay is cut.

    A layer built alone owns a private LSTM and starts from zero state on every call. :func:`share_relay`
    makes the layers of one stage share one LSTM and relay its state.
    """

    def __init__(
        self,
        num_features: int,
        norm: str | nn.Module = "bn",
        reduction: int = 4,
        name: str = "",
        channels_last: bool = False,
        relayed: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (("num_features", num_features), ("reduction", reduction)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name or 'HyperNorm'}: {arg} must be a positive int, got {value!r}")
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
        self.channels_last = channels_last
        self.relayed = relayed

    # False selects the reference path (standardizer module, then the affine), e.g. for comparisons.
    fused: bool = True
    # Running sums of (h, c) while hypernorm.nn.track_relay() has switched them on; None costs nothing.
    relay_stats: RelayStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relay = self.relay
        if self.starts_stage:
            relay.reset()
        try:
            parameters = relay.pass_parameters()
            self._check_input(x, parameters[0].dtype)
            return self._forward_path(x, relay, parameters)
        finally:
            if self.ends_stage:
                relay.reset()

    def _check_input(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor, got {type(x).__name__}")
        if (x.dim() < 3 or x.shape[-1] != self.num_features) if self.channels_last else \
                (x.dim() != 4 or x.shape[1] != self.num_features):
            shape = f"(N, ..., {self.num_features})" if self.channels_last else f"(N, {self.num_features}, H, W)"
            raise ValueError(f"{self.name}: expected input of shape {shape}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point input, got {x.dtype}")
        if x.dtype != dtype and not autocast_enabled(x.device.type):
            raise ValueError(f"{self.name}: input dtype {x.dtype} does not match the layer's parameters ({dtype}); "
                             f"cast one to the other (e.g. model.to({dtype})) or run under torch.autocast")

    def _forward_path(self, x: torch.Tensor, relay: StageRelay, parameters: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if x.numel() == 0:  # as torch's norms: an empty output, running statistics untouched
            return x.clone()
        if self.channels_last:  # the standardizer's own kernel (a LayerNorm), then the affine over the last dim
            h, c = self._lstm_step(x.mean(dim=tuple(range(1, x.dim() - 1))))
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.num_features,)
            return _affine(self.norm(x), h.view(shape), c.view(shape))
        if not self.fused:
            return self._forward_reference(x)
        norm = self.norm
        if cpu_kernel.applies(norm, x):
            out = cpu_kernel.batchnorm_forward(norm, x, relay.state if self.relayed else None, parameters,
                                               relay.pass_kernel_weights(parameters))
            if out is not None:
                self._hand_on(out[1], out[2], relay)
                return out[0]
        if fused_kernels.can_fuse(self.norm) and not fused_kernels.small_eager_training(x):
            return fused_kernels.fused_standardize_affine(self.norm, x, self._lstm_step)
        # the standardizer's own kernel, then the affine; the LSTM step still as two GEMMs
        h, c = self._lstm_step(x.mean(dim=(2, 3)))
        return _affine(fused_kernels.standardize(self.norm, x), per_map(h), per_map(c))

    def _lstm_step(self, u: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) from the relayed state (zeros when not ``relayed``); the cell's fused weights are built once
        per stage and pass. ``reference``: the cell's step as the equations read.

        Under autocast the step runs in float32, as autocast runs a norm: its GEMMs are (N, C), too small to
        gain from half precision, and its state is relayed through a stage, where half-precision rounding
        would compound; x's dtype is restored where the affine meets x."""
        if autocast_enabled(u.device.type):
            with torch.autocast(u.device.type, enabled=False):
                return self._lstm_step(u.float(), reference)
        relay = self.relay
        state = relay.state if self.relayed else None
        if reference:
            return self._hand_on(*relay.cell.forward_reference(u, state))
        return self._hand_on(*relay.cell(u, state, relay.pass_weights()))

    def _hand_on(self, h: torch.Tensor, c: torch.Tensor,
                 relay: StageRelay | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's (h, c): relayed to the next block, and counted while relay statistics are tracked."""
        (self.relay if relay is None else relay).hand_on((h, c))
        if self.relay_stats is not None:
            self.relay_stats.add(h, c)
        return h, c

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as the paper writes it: x_hat = norm(x), y = h * x_hat + c (``standardize`` is norm(x),
        with x shifted where its mean is far from its spread, for float32 precision)."""
        h, c = self._lstm_step(x.mean(dim=(2, 3)), reference=True)
        return _affine(fused_kernels.standardize(self.norm, x), per_map(h), per_map(c))

    def _follow(self, relay: StageRelay) -> None:
        """Use ``relay`` without registering it: the stage's first layer owns it in the state_dict."""
        if "relay" in self._modules:
            del self._modules["relay"]
        object.__setattr__(self, "relay", relay)
        self.starts_stage = False

    def extra_repr(self) -> str:
        role = "owns the stage LSTM" if self.starts_stage else "uses the stage LSTM"
        relay = "relays its state" if self.relayed else "no relay: zero state at every block"
        return f"{self.num_features}, {role}, {relay}, ends_stage={self.ends_stage}"


def _affine(x_hat: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """h * x_hat + c in x_hat's dtype, as the standardizer gives it (h and c are float32 under autocast)."""
    if h.dtype != x_hat.dtype:
        h, c = h.to(x_hat.dtype), c.to(x_hat.dtype)
    return torch.addcmul(c, x_hat, h)


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


def set_fused(model: nn.Module, on: bool) -> nn.Module:
    """Select the fused paths (True, the default) or the reference path (False) for every HyperNorm of
    ``model``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, HyperNorm):
            module.fused = on
    return model
