"""Experiment configuration: nested dicts from YAML, with dotted ``key=value`` overrides.

The generic machinery only; each schema lives beside its user (classification's ``DEFAULT_CONFIG`` and
``validate_config`` in ``hypernorm.engine.schema``, detection's in ``hypernorm.detection.schema``), and is the
default here when no other is given. Every valid key is in the defaults; a YAML file or an override only changes
values. Unknown keys are an error that lists the valid ones, so a typo never silently trains the wrong thing. A YAML
file may extend another with ``_base_: other.yaml`` (relative to the file); its own values are applied on top of the
other's.
A key whose default is an empty mapping (``{}``) takes any mapping, which replaces the previous one whole.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["load_config", "merge_config", "apply_overrides", "parse_overrides", "dump_config", "flatten",
           "rename_keys", "rename_overrides", "expect", "DATA_ENV"]

DATA_ENV = "HYPERNORM_DATA"  # environment variable naming the data root when data.root is null


def _classification_defaults() -> dict[str, Any]:
    from .engine.schema import DEFAULT_CONFIG  # imported here: the schema sits beside the engine that uses it

    return DEFAULT_CONFIG


def expect(key: str, value: Any, ok: bool, expected: str) -> None:
    """The one message for a bad config value: the key, what it expects, what it got."""
    if not ok:
        raise ValueError(f"config key {key!r} expects {expected}, got {value!r}")

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
    ``defaults`` (null: classification's), whose empty mappings mark the keys that take any mapping."""
    defaults = _classification_defaults() if defaults is None else defaults
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
    ``defaults`` (null: classification's).
    """
    defaults = _classification_defaults() if defaults is None else defaults
    flat_defaults = flatten(defaults)
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.05)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "unreadable"
            raise ValueError(f"override {item!r} is not valid YAML ({problem}); quote strings, close [lists] and "
                             f"{{mappings}}") from None
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


def _merge_file(config: dict[str, Any], path: Path, defaults: dict[str, Any], chain: tuple[Path, ...] = (),
                renamed: dict[str, str | None] | None = None) -> dict[str, Any]:
    """``config`` updated by the file at ``path``, after the files it extends (``_base_``)."""
    loaded = rename_keys(_read_yaml(path), renamed or {}, f"config file {str(path)!r}")
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
        config = _merge_file(config, base_path, defaults, chain, renamed)
    try:
        return merge_config(config, loaded, defaults=defaults)
    except ValueError as err:  # name the file: with _base_ chains the key may be in any of them
        raise ValueError(f"config file {str(path)!r}: {err}") from None


def rename_keys(config: dict[str, Any], renamed: dict[str, str], where: str) -> dict[str, Any]:
    """``config`` (nested) with deprecated dotted keys moved to their new names, each with a FutureWarning."""
    config = copy.deepcopy(config)
    for old, new in renamed.items():
        *old_sections, old_leaf = old.split(".")
        node = config
        for section in old_sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        warnings.warn(f"{where}: {_deprecation(old, new)}", FutureWarning, stacklevel=3)
        if new is None:
            continue
        *sections, leaf = new.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return config


def _deprecation(old: str, new: str | None) -> str:
    if new is None:  # a key with no successor: its behaviour is now the rule
        return f"config key {old!r} is deprecated and ignored; remove it (it is refused from the next release)"
    return f"config key {old!r} is deprecated; use {new!r} (the old name is refused from the next release)"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None, validate: Callable[[dict], dict] | None = None,
                renamed: dict[str, str | None] | None = None) -> dict[str, Any]:
    """``defaults``, updated by the YAML file at ``path`` (optional; with the files it extends through
    ``_base_``), then by ``overrides``, then checked by ``validate`` (which returns the config).

    With no ``defaults``, classification's schema and validation are used. ``renamed`` maps deprecated dotted keys
    to their new names (None: dropped), in the file and the overrides alike, with a FutureWarning each.
    """
    if defaults is None:
        from .engine.schema import DEFAULT_CONFIG, validate_config

        defaults, validate = DEFAULT_CONFIG, validate or validate_config
    config = copy.deepcopy(defaults)
    if path is not None:
        config = _merge_file(config, Path(path), defaults, renamed=renamed or {})
    config = apply_overrides(config, rename_overrides(overrides or [], renamed or {}), defaults)
    return validate(config) if validate is not None else config


def rename_overrides(overrides: list[str], renamed: dict[str, str | None]) -> list[str]:
    """``key=value`` strings with deprecated keys moved to their new names (or dropped), a FutureWarning each."""
    result = []
    for item in overrides:
        key, sep, text = item.partition("=")
        new = renamed.get(key.strip(), key.strip()) if sep else key
        if sep and key.strip() in renamed:
            warnings.warn(f"override {item!r}: {_deprecation(key.strip(), new)}", FutureWarning, stacklevel=3)
        if new is not None:
            result.append(f"{new}={text}" if sep else item)
    return result


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
