"""Strict loading of typed dataclass trees from YAML and dotted command-line overrides.

    cfg = load_config(RunConfig, "configs/tiny.yaml", ["train.max_steps=20", "parallel.tp=2"])

Unknown keys are errors that name the key and the closest valid one; wrong types name the key
and the expected type. Kept free of torch imports so the CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from bigllm.errors import ConfigError


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string: accept it as a float
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(str(key), names)}")
    kwargs = {name: _coerce(data[name], hints[name], prefix + name) for name in names if name in data}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}") from exc


def apply_override(data: dict, cls: type, override: str) -> None:
    """Apply one `a.b.c=value` override to the raw dict `data`; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value (e.g. train.max_steps=20)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}'{_closest(part, names)}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else ""
            return
        node_cls = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")
        node = node.setdefault(part, {})


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` from a YAML file plus dotted overrides, strictly; then run its `validate()`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            _check_complete(path, text)
            data = yaml.safe_load(text) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); fix or restore the file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for override in overrides or []:
        apply_override(data, cls, override)
    cfg = _build(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def from_dict(cls: type, data: dict):
    """Build and validate `cls` from plain data (e.g. the config saved in a checkpoint's meta.json)."""
    cfg = _build(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    """The config tree as plain data (what `save_config` writes)."""
    return dataclasses.asdict(cfg)


# The last line of every config bigllm writes: a file that has the first but not the last was cut
# short (a truncated YAML file can still parse, with whole sections silently left at defaults).
WRITTEN_HEAD = "# bigllm resolved config: every key, as the run used it\n"
WRITTEN_TAIL = "# end of bigllm config\n"


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config` reads it back to an equal tree."""
    Path(path).write_text(WRITTEN_HEAD + yaml.safe_dump(to_dict(cfg), sort_keys=False) + WRITTEN_TAIL)


def _check_complete(path: Path, text: str) -> None:
    if text.startswith(WRITTEN_HEAD) and not text.endswith(WRITTEN_TAIL):
        raise ConfigError(f"config file '{path}' was written by bigllm but is truncated (its last line "
                          f"'{WRITTEN_TAIL.strip()}' is missing); restore it, e.g. from the checkpoint's meta.json")
