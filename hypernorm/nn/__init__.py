"""The layers: trimmed meta LSTM, stage relay, HyperNorm, norm factory and model conversion."""
from .convert import ConversionPlan, StagePlan, convert, explain, find_stages
from .diagnostics import RelayRecorder, affine_rows, relay_rows, track_relay
from .factory import create_norm_layer, get_norm_layer, norm_names, split_norm_name, split_relay
from .hypernorm import HyperNorm, StageRelay, set_fused, share_relay
from .meta_lstm import BottleneckMLP, TrimmedLSTMCell
from .norms import (base_norm_names, create_base_norm, is_norm, register_norm, register_norm_type, standardizer_like,
                    syncs_across_processes)
from .replace import copy_norm_state, replace_module
from .switchable import SwitchableNorm2d  # registers "sn" (and so "shn")
from .sync_batchnorm import CPUSyncBatchNorm, use_cpu_sync_batchnorm

__all__ = [
    "BottleneckMLP",
    "CPUSyncBatchNorm",
    "ConversionPlan",
    "HyperNorm",
    "RelayRecorder",
    "StagePlan",
    "StageRelay",
    "SwitchableNorm2d",
    "TrimmedLSTMCell",
    "affine_rows",
    "base_norm_names",
    "convert",
    "copy_norm_state",
    "create_base_norm",
    "create_norm_layer",
    "explain",
    "find_stages",
    "get_norm_layer",
    "is_norm",
    "norm_names",
    "register_norm",
    "register_norm_type",
    "relay_rows",
    "replace_module",
    "set_fused",
    "share_relay",
    "split_norm_name",
    "split_relay",
    "standardizer_like",
    "syncs_across_processes",
    "track_relay",
    "use_cpu_sync_batchnorm",
]
