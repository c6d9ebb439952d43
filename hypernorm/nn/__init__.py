"""The layers: trimmed meta LSTM, stage relay, HyperNorm, norm factory and model conversion."""
from .convert import ConversionPlan, StagePlan, convert, explain, find_stages
from .factory import create_norm_layer, get_norm_layer, norm_names, split_norm_name
from .hypernorm import HyperNorm, StageRelay, share_relay
from .meta_lstm import BottleneckMLP, TrimmedLSTMCell
from .norms import base_norm_names, create_base_norm, is_norm, register_norm, standardizer_like
from .switchable import SwitchableNorm2d  # registers "sn" (and so "shn")

__all__ = [
    "BottleneckMLP",
    "ConversionPlan",
    "HyperNorm",
    "StagePlan",
    "StageRelay",
    "SwitchableNorm2d",
    "TrimmedLSTMCell",
    "base_norm_names",
    "convert",
    "create_base_norm",
    "create_norm_layer",
    "explain",
    "find_stages",
    "get_norm_layer",
    "is_norm",
    "norm_names",
    "register_norm",
    "share_relay",
    "split_norm_name",
    "standardizer_like",
]
