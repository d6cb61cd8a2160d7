"""Typed dataclasses from plain mappings (recipe sections, LLM overrides): every key checked
against the fields, nested dataclasses built recursively, an unknown key or a wrong type refused
with its dotted name. Two rules hold for every dataclass built here: a `limit` or `sample` (rows
to take) is a positive integer or null, since `limit: 0` reads as "none" to a user and as "all" to
`rows[:limit] if limit`; and a `run_name` names a folder strictly inside `runs_dir`, so no run
writes outside it (`run_name=../../x`). Both safecot/config.py (recipes) and safecot/backends.py
(LLMConfig.merged) build on it; it imports neither, so they do not import each other.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file and key."""


def from_dict(cls: type, values: dict, where: str, source: str = "recipe") -> Any:
    """Instantiate a (possibly nested) dataclass, refusing unknown keys with their dotted name."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: {', '.join(known)})")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}", source)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {where}: {e}") from e
    for key in ("limit", "sample", "samples"):  # rows to take, or answers per prompt (eval.samples: never null)
        value = getattr(obj, key, None) if key in known else None
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            what = "number of answers per prompt" if key == "samples" else "number of rows or null (all)"
            raise ConfigError(f"{source}: '{where}.{key}' must be a positive {what}, got {value!r}")
    if "run_name" in known and "runs_dir" in known:
        check_run_name(obj.run_name, obj.runs_dir, source)
    return obj


def check_run_name(run_name, runs_dir, source: str = "recipe") -> None:
    """`run_name` names a folder strictly inside `runs_dir`: not empty, not absolute, no `..`."""
    name = str(run_name or "")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or os.path.isabs(name) or ".." in parts:
        raise ConfigError(f"{source}: 'run_name' must name a folder inside runs_dir ({runs_dir}): "
                          f"not empty, not absolute, no '..'; got {run_name!r}")


def _coerce(hint, value, where, source):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping")
        return from_dict(hint, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, source) if len(inner) == 1 else value
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be a list")
        return [_coerce(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):  # YAML's true is no number
        raise ConfigError(f"{source}: '{where}' should be int, got {value!r}")
    if hint in (int, float, str, bool) and value is not None and not isinstance(value, hint):
        raise ConfigError(f"{source}: '{where}' should be {hint.__name__}, got {value!r}")
    return value
