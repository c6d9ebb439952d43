"""Experiment configuration: nested dicts from YAML, with dotted ``key=value`` overrides.

Every valid key is in the defaults (:data:`DEFAULT_CONFIG` for classification; detection passes its own,
``hypernorm.detection.DEFAULT_DETECTION_CONFIG``); a YAML file or an override only changes values. Unknown keys
are an error that lists the valid ones, so a typo never silently trains the wrong thing. A YAML file may extend
another with ``_base_: other.yaml`` (relative to the file); its own values are applied on top of the other's.
A key whose default is an empty mapping (``{}``) takes any mapping, which replaces the previous one whole.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_CONFIG", "load_config", "merge_config", "apply_overrides", "parse_overrides", "validate_config", "dump_config",
           "flatten", "DATA_ENV"]

DATA_ENV = "HYPERNORM_DATA"  # environment variable naming the data root when data.root is null

DEFAULT_CONFIG: dict[str, Any] = {
    "model": {
        "name": "resnet20",  # any name of hypernorm.list_models()
        "norm": "bn",  # bn, bhn, gn, ghn, syncbn, syncbhn, ... (hypernorm.nn.norm_names())
        "num_classes": None,  # null: the data set's class count
        "sync_bn": False,  # convert BatchNorm to SyncBatchNorm (keeps HyperNorm layers) when distributed
    },
    "data": {
        "dataset": "cifar100",  # cifar100 | cifar10 | imagenet
        "root": None,  # null: $HYPERNORM_DATA, else ./data
        "download": True,  # fetch the official CIFAR archives when missing (needs internet)
        "train_subset": None,  # int: a fixed-seed random subset of the train set, for quick runs
        "augment": True,  # crop + flip (CIFAR), random-resized crop + flip (ImageNet)
        "workers": 2,  # DataLoader worker processes per training process
        "test_batch_size": None,  # null: train.batch_size
        "image_size": None,  # ImageNet crop size (null: 224); CIFAR is always 32
    },
    "train": {
        "epochs": 164,
        "batch_size": 128,  # per process; the global batch is batch_size * world size
        "device": "auto",  # auto (CUDA when available) | cpu | cuda
        "threads": None,  # torch CPU threads per process (null: torch's default); 1 avoids collapse on a busy CPU
        "amp": False,  # float16 autocast + GradScaler, CUDA only
        "channels_last": False,
        "grad_clip": None,  # max global L2 norm of the gradients, or null
        "compile": False,  # torch.compile the model
        "seed": 0,
        "deterministic": False,  # deterministic kernels (slower on CUDA)
        "eval_every": 1,  # evaluate on the test set every N epochs (and always after the last)
    },
    "optim": {
        "lr": 0.1,  # for the global batch; not rescaled automatically
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "sched": "step",  # step | cosine
        "warmup_epochs": 0,  # linear warm-up from warmup_start_factor * lr, per iteration
        "warmup_start_factor": 0.1,
        "milestones": [81, 122],  # epochs (step schedule)
        "gamma": 0.1,  # step schedule factor
        "min_lr": 0.0,  # cosine schedule floor
        "label_smoothing": 0.0,
    },
    "output": {
        "dir": "runs/default",  # the run folder: config.yaml, metrics.csv, summary.json, checkpoint.pt
    },
}

_CHOICES = {
    "data.dataset": ("cifar100", "cifar10", "imagenet"),
    "optim.sched": ("step", "cosine"),
}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1, "c": {}} (an empty mapping is a value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _valid_keys(defaults: dict[str, Any]) -> str:
    return ", ".join(flatten(defaults))


def _subtree(defaults: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The section of ``defaults`` at ``prefix`` ("model." -> defaults["model"]); {} where there is none."""
    node: Any = defaults
    for section in prefix.split(".")[:-1]:
        node = node.get(section) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _is_free_mapping(default: Any) -> bool:
    """An empty mapping default: any keys (e.g. detection's model.kwargs, passed on to torchvision)."""
    return isinstance(default, dict) and not default


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Values keep the default's type (ints pass for floats); a null default accepts anything."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"config key {key!r} expects a {type(default).__name__} (like {default!r}), got {value!r}")
    return value


def merge_config(base: dict[str, Any], update: dict[str, Any], prefix: str = "",
                 defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` updated with ``update`` (a new dict); keys not in ``base`` raise ValueError listing the keys of
    ``defaults`` (null: :data:`DEFAULT_CONFIG`), whose empty mappings mark the keys that take any mapping."""
    defaults = DEFAULT_CONFIG if defaults is None else defaults
    schema = _subtree(defaults, prefix)
    merged = copy.deepcopy(base)
    for key, value in (update or {}).items():
        name = f"{prefix}{key}"
        if key not in merged:
            raise ValueError(f"unknown config key {name!r}; valid keys: {_valid_keys(defaults)}")
        if _is_free_mapping(schema.get(key)):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} expects a mapping (like {{key: value}}), got {value!r}")
            merged[key] = copy.deepcopy(value)  # replaced whole, not merged key by key
        elif isinstance(merged[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} is a section; set its keys ({', '.join(merged[key])})")
            merged[key] = merge_config(merged[key], value, name + ".", defaults)
        else:
            merged[key] = _check_type(name, value, merged[key])
    return merged


def parse_overrides(overrides: list[str], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``["optim.lr=0.05", "model.norm=bhn"]`` -> ``{"optim": {"lr": 0.05}, "model": {"norm": "bhn"}}``.

    Values are parsed as YAML (numbers, null, true/false, [lists], {mappings}); keys are checked against
    ``defaults`` (null: :data:`DEFAULT_CONFIG`).
    """
    defaults = DEFAULT_CONFIG if defaults is None else defaults
    flat_defaults = flatten(defaults)
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.05)")
        value = yaml.safe_load(text) if text.strip() else None
        name = key.strip()
        if name not in flat_defaults:
            if any(k.startswith(name + ".") for k in flat_defaults):
                raise ValueError(f"config key {name!r} is a section; set its keys, e.g. {name}.<key>=value")
            mapping = next((k for k, v in flat_defaults.items() if _is_free_mapping(v) and name.startswith(k + ".")),
                           None)
            if mapping is not None:
                raise ValueError(f"config key {mapping!r} is set whole: {mapping}={{{name[len(mapping) + 1:]}: ...}}")
            raise ValueError(f"unknown config key {name!r}; valid keys: {_valid_keys(defaults)}")
        value = _check_type(name, value, flat_defaults[name])
        *sections, leaf = name.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def apply_overrides(config: dict[str, Any], overrides: list[str],
                    defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` updated by dotted ``key=value`` strings (see :func:`parse_overrides`)."""
    return merge_config(config, parse_overrides(overrides, defaults), defaults=defaults)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check the values that have a fixed set of choices or a range; returns ``config``."""
    flat = flatten(config)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ValueError(f"config key {key!r} must be one of {', '.join(choices)}, got {flat[key]!r}")
    for key in ("train.epochs", "train.batch_size", "data.workers", "train.eval_every"):
        if flat[key] < (0 if key == "data.workers" else 1):
            raise ValueError(f"config key {key!r} must be positive, got {flat[key]!r}")
    threads = flat["train.threads"]
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"train.threads must be a positive int or null, got {threads!r}")
    subset = flat["data.train_subset"]
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ValueError(f"data.train_subset must be a positive int or null, got {subset!r}")
    milestones = flat["optim.milestones"]
    if any(not isinstance(m, int) for m in milestones) or milestones != sorted(milestones):
        raise ValueError(f"optim.milestones must be increasing epoch numbers, got {milestones!r}")
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def _merge_file(config: dict[str, Any], path: Path, defaults: dict[str, Any], chain: tuple[Path, ...] = ()
                ) -> dict[str, Any]:
    """``config`` updated by the file at ``path``, after the files it extends (``_base_``)."""
    loaded = _read_yaml(path)
    base = loaded.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"config file {str(path)!r}: _base_ must be the path of another config (relative to "
                             f"this one), got {base!r}")
        chain = chain + (path.resolve(),)
        base_path = path.parent / base
        if base_path.resolve() in chain:
            raise ValueError(f"config file {str(path)!r}: _base_ {base!r} makes a cycle "
                             f"({' -> '.join(p.name for p in chain)} -> {base_path.name})")
        config = _merge_file(config, base_path, defaults, chain)
    try:
        return merge_config(config, loaded, defaults=defaults)
    except ValueError as err:  # name the file: with _base_ chains the key may be in any of them
        raise ValueError(f"config file {str(path)!r}: {err}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] = DEFAULT_CONFIG) -> dict[str, Any]:
    """``defaults``, updated by the YAML file at ``path`` (optional; with the files it extends through
    ``_base_``), then by ``overrides``. Configs of :data:`DEFAULT_CONFIG` are then checked by
    :func:`validate_config`."""
    config = copy.deepcopy(defaults)
    if path is not None:
        config = _merge_file(config, Path(path), defaults)
    config = apply_overrides(config, list(overrides or []), defaults)
    return validate_config(config) if defaults is DEFAULT_CONFIG else config


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
