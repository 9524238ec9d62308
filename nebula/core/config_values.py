"""How one config value, from TOML or from a NEBULA_* environment variable, becomes its field's type.

Pure; config.py calls these per field. Errors are ValidationError naming where the value came from.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any

from nebula.errors import ValidationError


def show_key(key: object) -> str:
    """A key as written in TOML when it is a plain one, else quoted (TOML allows any string as a key)."""
    return key if isinstance(key, str) and key.isprintable() and key and len(key) <= 60 else show(key)


def show(value: object) -> str:
    """A value or key for a one-line message: repr'd (so a newline shows as \\n) and cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValidationError(where, f"must be true or false, got {show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValidationError(where, f"must be an integer, got {show(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if math.isfinite(number):
                return number
            raise ValidationError(where, f"must be a finite number, got {show(value)}")
        raise ValidationError(where, f"must be a number, got {show(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValidationError(where, f"must be a string, got {show(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValidationError(where, f"must be a list, got {show(value)}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type at {where}")
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def from_env(raw: str, hint: Any, where: str) -> Any:
    """Env values are strings: parse them by the field's type (lists as JSON or comma-separated)."""
    if hint is str:
        return raw
    if hint is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValidationError(where, f"must be true or false, got {show(raw)}")
    if typing.get_origin(hint) is tuple:
        text = raw.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except (ValueError, RecursionError):
                raise ValidationError(where, f"is not a valid JSON list: {show(raw)}") from None
        return [p.strip() for p in text.split(",") if p.strip()]
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        kind = "an integer" if hint is int else "a number"
        raise ValidationError(where, f"must be {kind}, got {show(raw)}") from None
