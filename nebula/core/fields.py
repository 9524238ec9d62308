"""Strict readers of JSON fields, shared by every record type: each raises only ValidationError, naming the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from nebula.errors import ValidationError

NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def validate_name(value: object, field_name: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):  # fullmatch: `$` admits a final "\n"
        raise ValidationError(field_name, "must be 1-63 characters of lowercase letters, digits, '.', '_' or '-', "
                                          "starting with a letter or digit")
    return value


def expect_field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in obj or obj[key] is None:
        if default is ...:
            raise ValidationError(key, "is required")
        return default
    value = obj[key]
    # bool is an int in Python; a JSON `true` must not pass as a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValidationError(key, f"must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ValidationError(key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def expect_number(obj: Mapping[str, Any], key: str, default: Any = ...) -> float:
    """A JSON number as a finite float: an integer too large for a float (`1e400` written out) is refused
    here, where `float()` would raise OverflowError."""
    value = expect_field(obj, key, (int, float), default)
    try:
        number = float(value)
    except OverflowError:
        raise ValidationError(key, "is out of range") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValidationError(key, "must be a finite number")
    return number


def expect_int(obj: Mapping[str, Any], key: str, low: int, high: int, default: Any = ...) -> int:
    """An integer field within [low, high]."""
    value: int = expect_field(obj, key, int, default)
    if not low <= value <= high:
        raise ValidationError(key, f"must be between {low} and {high}")
    return value


def expect_int_list(obj: Mapping[str, Any], key: str, low: int, high: int) -> tuple[int, ...]:
    values = expect_field(obj, key, list, [])
    if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values):
        raise ValidationError(key, f"must be a list of integers between {low} and {high}")
    return tuple(values)


def expect_str_map(obj: Mapping[str, Any], key: str) -> dict[str, str]:
    value = expect_field(obj, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValidationError(key, "must map strings to strings")
    return dict(value)


def expect_str_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    values = expect_field(obj, key, list, [])
    if not all(isinstance(v, str) for v in values):
        raise ValidationError(key, "must be a list of strings")
    return tuple(values)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
             dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
