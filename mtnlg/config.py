"""Typed configuration: dataclasses loaded from YAML/dicts and ``key=value`` overrides.

Every config in mtnlg is a (nested) dataclass deriving from :class:`Config`.
``load_config(Cls, yaml_path, overrides, base=...)`` is the one loader; it rejects, with a
message naming the key and the value:

* unknown keys (``train.setps=10`` -> "unknown key 'train.setps'; did you mean 'steps'?"),
* wrong types (``train.steps=ten`` -> "train.steps: expected int, got 'ten'"),
* out-of-range values, declared per field with ``field(metadata=...)``::

      steps: int = field(default=100, metadata={"min": 1})
      norm: str = field(default="layernorm", metadata={"choices": ("layernorm", "rmsnorm")})

* broken cross-field rules (``hidden_size % num_heads``), in the dataclass's ``validate()``.

Keys and types are checked while parsing; ranges and cross-field rules when a config object
is made (``Config.__post_init__``), whichever way it is made: by the loader, by
``dataclasses.replace`` or by a constructor call. So every value is checked once, where
the object comes into being, and code that receives a config never checks it again.
A config crosses a process boundary whole, as one YAML file (``dump_yaml``), and is loaded
on the other side by the same loader.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


class Config:
    """Base of the config dataclasses: a config checks its own fields' ranges (the
    ``min``/``max``/``gt``/``choices`` metadata) and its ``validate()`` rules when it is
    made. Nested configs were checked when they were made."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range(f, getattr(self, f.name), f.name)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; each message names the keys and the numbers involved."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    """Convert ``value`` to ``tp`` (bool/int/float/str), accepting strings from the CLI."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            try:
                if _coerce_scalar(type(a), value, key) == a:
                    return a
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *rest) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k_tp, k, key): _coerce(v_tp, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    return _coerce_scalar(tp, value, key)


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {list(meta['choices'])}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else k
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{where}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_prefixed(prefix, str(e), fields)) from None


def _prefixed(prefix: str, message: str, fields) -> str:
    """``steps: must be >= 1`` raised by a nested config -> ``train.steps: must be >= 1``;
    messages that already name their full key are left alone."""
    head = re.split(r"[:= ]", message, maxsplit=1)[0]
    return f"{prefix}.{message}" if prefix and head in fields else message


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data (JSON/YAML-safe) dict of a config dataclass."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}`` (values typed later)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(out, k, v)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """YAML ``text`` that must hold a mapping (empty text: ``{}``); ``ConfigError`` naming
    ``where`` (a file, a parameter, an environment variable) otherwise."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    from mtnlg import storage

    return yaml_mapping(storage.read_text(str(path)), str(path))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from ``base`` (a dict: a recipe, a config as data), then a YAML file,
    then ``key=value`` overrides, each over the one before. A class may define a static
    ``expand(data) -> data`` that fills sections from named defaults before the data is
    typed (``TrainRunConfig`` starts ``model`` from ``model_preset``)."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, read_yaml(path))
    if overrides:
        data = merge(data, parse_overrides(list(overrides)))
    expand = getattr(cls, "expand", None)
    if callable(expand):
        data = expand(data)
    return from_dict(cls, data)


def replace(cfg: T, overrides: list[str]) -> T:
    """A copy of ``cfg`` with ``key=value`` overrides applied (checked as any load is)."""
    return load_config(type(cfg), base=to_dict(cfg), overrides=overrides)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)
