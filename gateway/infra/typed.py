"""Turn TOML tables into frozen dataclasses, refusing unknown keys, wrong types and bad values.

Every error names the file, the dotted key and the reason, on one line, so a bad configuration
stops the start with a message an administrator can act on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(Exception):
    """A configuration problem, located by file and key."""

    def __init__(self, file: str | Path, key: str, reason: str) -> None:
        self.file, self.key, self.reason = str(file), key, reason
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + reason)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list of {_describe(get_args(tp)[0])}"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "Path": "path string", "date": "date (YYYY-MM-DD)"}.get(tp.__name__, tp.__name__)
    return str(tp)


def convert(value: Any, tp: Any, file: str | Path, key: str) -> Any:
    """Check and convert one TOML value to the annotated type ``tp``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert(value, args[0], file, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(file, key, f"{value!r} is not one of {_describe(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected a list, got {type(value).__name__}")
        item = get_args(tp)[0]
        return tuple(convert(v, item, file, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a table, got {type(value).__name__}")
        return build(tp, value, file, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(file, key, f"expected a path string, got {value!r}")
        return Path(value)
    if tp is dt.date:
        if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
            raise ConfigError(file, key, f"expected a date (YYYY-MM-DD, unquoted), got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a programming error


def build(cls: type, table: dict[str, Any], file: str | Path, prefix: str = "", /,
          **extra: Any) -> Any:
    """Build dataclass ``cls`` from ``table``; unknown keys and missing required keys are errors.

    ``extra`` supplies fields that do not come from the table (``metadata={"toml": False}``).
    After conversion, a ``validate(file, prefix)`` method on the class, if any, checks values.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.metadata.get("toml", True)}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(table) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(file, dotted + unknown[0], f"unknown key (known keys: {known})")
    values = {}
    for name, field in fields.items():
        if name in table:
            values[name] = convert(table[name], hints[name], file, dotted + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(file, dotted + name, "required key is missing")
    obj = cls(**values, **extra)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(file, prefix)
    return obj
