"""Typed configs: nested dataclasses built from YAML / dicts, with errors that name the key.

Every component declares its settings as a dataclass with a docstring per field. A run is a YAML
file (configs/*.yaml) whose nested mappings mirror the nested dataclasses; `build_config` turns the
mapping into the dataclass and rejects unknown keys and wrong types, naming the full dotted key
(e.g. ``prior.weight``) and the file. Command-line overrides are ``dotted.key=value`` strings whose
value is parsed as YAML (so ``3``, ``1e-3``, ``true``, ``[1, 2]`` and ``null`` work as expected).

This module knows nothing about what the configs hold; 2D and 3D reconstruction share it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_BOOL_WORDS = {False: ("off", "false", "no"), True: ("on", "true", "yes")}
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config key is unknown, missing, or holds a value of the wrong type."""


def _describe(source: str | None) -> str:
    return f" in {source}" if source else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists -> tuples, ints -> floats)."""
    where = _describe(source)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}'{where} may not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{key}'{where}: {value!r} matches none of {_type_name(tp)}")
    if value is None and not (origin is Literal and None in typing.get_args(tp)):
        raise ConfigError(f"config key '{key}'{where} may not be null (expected {_type_name(tp)})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and value not in allowed:
            # YAML 1.1 reads unquoted off / on / no / yes as booleans: map them back to the word
            words = [w for w in (_BOOL_WORDS[value]) if w in allowed]
            value = words[0] if len(words) == 1 else value
        if value not in allowed:
            raise ConfigError(f"config key '{key}'{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}'{where} must be a mapping of {tp.__name__} "
                              f"fields, got {type(value).__name__} {value!r}")
        return build_config(tp, value, source=source, prefix=key)
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}'{where} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}'{where} must have {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return list(items) if origin is list or tp is list else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}'{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}'{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}'{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}'{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}'{where} must be a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"config key '{key}'{where} must be {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}'{where}: unsupported annotation {tp!r}")


def _close_names(name: str, known: Mapping[str, Any]) -> list[str]:
    """Known keys that look like `name`: near spellings and renamed keys (final_lr_fraction ->
    lr_final_fraction, autocast_bf16 -> bf16: the old name contains, or reorders, the new one)."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    words = set(name.lower().split("_"))
    for key in known:
        same_words = set(key.split("_")) == words
        if key not in close and (same_words or (len(key) >= 4 and key in name) or (len(name) >= 4 and name in key)):
            close.append(key)
    return close


def build_config(cls: type[T], data: Mapping[str, Any] | None, *, source: str | None = None,
                 prefix: str = "") -> T:
    """Build the (nested) dataclass `cls` from a mapping; missing keys keep their defaults.

    Raises ConfigError naming the full dotted key (and `source`, e.g. the YAML file) for unknown
    keys, missing required keys and values of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config{_describe(source)}{' at ' + prefix if prefix else ''} must be a "
                          f"mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        full = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        hints = [f"{key!r}: did you mean {' or '.join(map(repr, guesses))}?" for key, guesses in
                 ((key, _close_names(str(name), fields)) for key, name in zip(full, unknown)) if guesses]
        raise ConfigError(f"unknown config key{'s' if len(full) > 1 else ''} {', '.join(map(repr, full))}"
                          f"{_describe(source)}{' (' + '; '.join(hints) + ')' if hints else ''}; "
                          f"{cls.__name__} accepts: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}'{_describe(source)} is required")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # __post_init__ validation
        raise ConfigError(f"config{_describe(source)}{' at ' + prefix if prefix else ''}: {err}") from err


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict / list form of a config (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:  # e.g. an input file placed after --set, which takes every word after it
            raise ConfigError(f"override {item!r} must look like dotted.key=value (put positional "
                              f"arguments before --set)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{part}'")
            node = child
        node[parts[-1]] = value
    return nested


OVERRIDE_HELP = ("config overrides KEY=VALUE (dotted keys, YAML values), e.g. --set optim.steps=400 "
                 "prior.every=2; the flag may be repeated")


def add_override_option(parser, example: str = "optim.steps=400 prior.every=2") -> None:
    """`--set KEY=VALUE ...` on an argparse parser, parsed the same way by every launcher: one
    flag takes several overrides and may be repeated (values collected in `args.set`, in order)."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=OVERRIDE_HELP.replace("optim.steps=400 prior.every=2", example))


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in `update` replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, updated by the YAML file at `path`, then by ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        source = str(path)
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, "
                              f"got {type(loaded).__name__}")
        data = dict(loaded or {})
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source = f"{source} + overrides" if source else "overrides"
    return build_config(cls, data, source=source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
