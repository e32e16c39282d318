"""One schema mechanism for every file a user writes: training configs, sweep files, feature
files, topics files. A file's shape is a dataclass; ``build`` checks keys and types recursively
and reports the first fault as a ``ConfigError`` with its dotted path and the fix.

Supported field types: nested dataclasses, ``list[X]``, ``dict[str, X]``, ``X | None`` and other
unions, ``Literal[...]``, ``Any``, and the scalars. A field without a default is required. A
dataclass's own ``__post_init__`` checks run too; a ``ValueError`` or ``TypeError`` they raise
becomes a ``ConfigError`` at that dataclass's path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from codebook.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"expected a mapping, got {data!r}",
                          "write key: value pairs")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(join(where, unknown[0]), "unknown key", f"valid keys: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(join(where, missing[0]), "missing", f"set {missing[0]}")
    kwargs = {name: check_type(value, hints[name], join(where, name))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(where or cls.__name__, str(err), "fix this section") from err


def check_type(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against ``hint`` (dataclasses built); a ConfigError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"got {value!r}", f"use one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}", "write [a, b, ...]")
        return [check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}", "write {key: value}")
        if not args or args[1] is Any:
            return value
        return {k: check_type(v, args[1], join(path, str(k))) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(path, f"expected {hint.__name__}, got {value!r}", "write a number")
    if not isinstance(value, hint):
        raise ConfigError(path, f"expected {hint.__name__}, got {type(value).__name__} {value!r}",
                          f"write a {hint.__name__}")
    return value


def read_yaml(path: str | Path, where: str, fix: str) -> Any:
    """A YAML file's content; a missing file or bad YAML is a ConfigError at ``where``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(where, f"{path} not found", fix)
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(where, f"cannot read {path}: {err}", fix) from err


def load_overridden(cls: type[T], path: str | Path, overrides: list[str] | None,
                    folder: str) -> T:
    """A YAML file of shape ``cls`` with ``key=value`` overrides (values read as YAML), built
    and checked; ``folder`` names where such files live, for the error messages."""
    data = read_yaml(path, "--config", f"pass a YAML file (see {folder})")
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} is not a mapping", f"see {folder}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", f"got {item!r}", "use key=value")
        set_dotted(data, key, yaml.safe_load(value))
    return build(cls, data, "")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key`` "a.b", creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{part} is not a section", "check the dotted key")
    node[parts[-1]] = value


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def flatten(d: dict[str, Any], prefix: str = "", keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; mappings named in ``keep`` stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in keep:
            out.update(flatten(v, key + ".", keep))
        else:
            out[key] = v
    return out
