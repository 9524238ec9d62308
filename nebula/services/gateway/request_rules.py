"""Request rules of the inference endpoints as data: one table per endpoint, read twice.

`check_body` validates a parsed body against the table (raising ValidationError(field, message)) and
`body_schema` renders the same table as the JSON Schema GET /openapi.json serves, so the gateway's checks
and its document cannot say different things (tests/unit/test_request_rules.py holds them to it). A rule
that does not fit a plain field (a chat message's role, a prompt's token ids) is a named `Custom` or `Item`:
its check and its schema fragment sit side by side, so it too is written in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nebula.core.fields import expect_field, expect_number
from nebula.errors import ValidationError

Body = Mapping[str, Any]
Schema = dict[str, Any]

_JSON_TYPES: Final[Mapping[type, str]] = {str: "string", int: "integer", float: "number", bool: "boolean",
                                          list: "array", dict: "object"}


def opt(schema: Schema) -> Schema:
    """An optional field: JSON null counts as absent (fields.expect_field)."""
    return {"anyOf": [schema, {"type": "null"}]}


@dataclass(frozen=True)
class Item:
    """What each element of a list field must be: `ok` is asked of every element (a failure names the field,
    with its message), or `check` raises itself, naming the element (messages[2].role)."""

    schema: Schema
    ok: Callable[[object], bool] | None = None
    check: Callable[[object, str], None] | None = None


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (its schema is a dict)
class Custom:
    """An irregular value rule: `check` runs on a present value once its type is checked; `schema` is the
    value's whole schema (type included), in place of the one the plain attributes would render."""

    check: Callable[[Any, str], None]
    schema: Schema


@dataclass(frozen=True)
class Field:
    """One body field. `types` are Python's types of the JSON value ((int, float) is a number; empty: any, the
    custom check judges); `message` replaces the default words of a failed bound, enum or item."""

    name: str
    types: tuple[type, ...]
    required: bool = False
    # int | float, not float: where the module is compiled (scripts/compile_data_path.py), a `float` annotation
    # turns an int into a float, and a bound or value past 2**53 (a seed's int64 range) would round.
    minimum: int | float | None = None
    maximum: int | float | None = None
    exclusive_minimum: bool = False
    finite: bool = False  # refuse inf and overflow (expect_number); JSON Schema has no words for them
    enum: tuple[str, ...] = ()
    non_empty: bool = False  # a string or list value must not be empty
    items: Item | None = None
    custom: Custom | None = None
    message: str = ""


@dataclass(frozen=True)
class Shape:
    """One shape of a body: its fields in the order they are checked. `unless` names a field whose presence
    rules this shape out (the older spelling of the same request wins)."""

    fields: tuple[Field, ...]
    unless: str = ""


@dataclass(frozen=True)
class Rules:
    """An endpoint's body rules: one shape, or several with `pick` choosing the one a body is checked against
    (`combine` is the JSON Schema keyword the alternatives render under)."""

    shapes: tuple[Shape, ...]
    pick: Callable[[Body], int] = lambda _: 0
    combine: str = "anyOf"


def rules(*fields: Field) -> Rules:
    return Rules((Shape(fields),))


# --- element kinds shared by the tables ---------------------------------------------------------------------

def is_token(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


TOKEN_SCHEMA: Schema = {"type": "integer", "minimum": 0}
STRINGS = Item({"type": "string"}, ok=lambda v: isinstance(v, str))
TOKENS = Item(TOKEN_SCHEMA, ok=is_token)
OBJECTS = Item({"type": "object"}, ok=lambda v: isinstance(v, dict))

# Every body names the model it is for; validation.check_request checks it before the endpoint's rules.
MODEL_SCHEMA: Final[Schema] = {"type": "string", "pattern": "\\S",
                               "description": "A loaded model's name (GET /v1/models)."}


def check_model(body: Body) -> str:
    model: str = expect_field(body, "model", str)
    if not model.strip():
        raise ValidationError("model", "must not be empty")
    return model


# --- the interpreter ----------------------------------------------------------------------------------------

def check_body(endpoint_rules: Rules, body: Body) -> None:
    """Raise ValidationError(field, message) for the first field of the picked shape that breaks its rule."""
    get = body.get
    for field in endpoint_rules.shapes[endpoint_rules.pick(body)].fields:
        # Most optional fields are absent (null counts as absent): skip them before any per-field work, which
        # cuts a typical chat body's check from 5.4 to 4.0 us (the hand-written checks took 2.7 us).
        if field.required or get(field.name) is not None:
            check_field(field, body)


def check_field(field: Field, body: Body) -> None:
    name = field.name
    if not field.types:
        value = body.get(name)
        if value is None:
            if field.required:
                raise ValidationError(name, "is required")
            return
    elif field.finite:
        if body.get(name) is None and not field.required:
            return
        value = expect_number(body, name)
    else:
        value = expect_field(body, name, field.types, ... if field.required else None)
        if value is None:
            return
    if field.non_empty and isinstance(value, (str, list)) and not value:
        raise ValidationError(name, "must not be empty")
    if field.enum and value not in field.enum:
        raise ValidationError(name, field.message or f"must be {' or '.join(repr(e) for e in field.enum)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_bounds(field, value)
    if isinstance(value, list) and field.items is not None:
        _check_items(field, field.items, value)
    if field.custom is not None:
        field.custom.check(value, name)


def _check_bounds(field: Field, value: int | float) -> None:
    lo, hi = field.minimum, field.maximum
    if lo is not None and (value <= lo if field.exclusive_minimum else value < lo):
        if field.message:
            raise ValidationError(field.name, field.message)
        if field.types == (int,):
            raise ValidationError(field.name, f"must be an integer >= {lo}")
        raise ValidationError(field.name, f"must be {'greater than' if field.exclusive_minimum else 'at least'} {lo}")
    if hi is not None and value > hi:
        raise ValidationError(field.name, field.message or f"must be at most {hi}")


def _check_items(field: Field, item: Item, value: list[Any]) -> None:
    if item.ok is not None and not all(item.ok(v) for v in value):
        raise ValidationError(field.name, field.message)
    if item.check is not None:
        for i, v in enumerate(value):
            item.check(v, f"{field.name}[{i}]")


# --- the renderer -------------------------------------------------------------------------------------------

def body_schema(endpoint_rules: Rules) -> Schema:
    """The request body's JSON Schema: every field of each shape (other fields are the engine's to judge)."""
    bodies = [_shape_schema(shape) for shape in endpoint_rules.shapes]
    return bodies[0] if len(bodies) == 1 else {endpoint_rules.combine: bodies}


def _shape_schema(shape: Shape) -> Schema:
    body: Schema = {"type": "object",
                    "properties": {"model": MODEL_SCHEMA, **{f.name: field_schema(f) for f in shape.fields}},
                    "required": ["model", *(f.name for f in shape.fields if f.required)],
                    "additionalProperties": True}
    if shape.unless:
        body["not"] = {"required": [shape.unless]}
    return body


def field_schema(field: Field) -> Schema:
    """A field's value schema; an optional one also takes null, which the checks read as absent."""
    schema = field.custom.schema if field.custom is not None else _value_schema(field)
    return schema if field.required else opt(schema)


def _value_schema(field: Field) -> Schema:
    if field.enum:
        return {"enum": list(field.enum)}
    kinds = list(dict.fromkeys("number" if t is float or (t is int and float in field.types) else _JSON_TYPES[t]
                               for t in field.types))
    alternatives = [_kind_schema(field, kind) for kind in kinds]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _kind_schema(field: Field, kind: str) -> Schema:
    schema: Schema = {"type": kind}
    if kind in ("integer", "number"):
        if field.minimum is not None:
            schema["exclusiveMinimum" if field.exclusive_minimum else "minimum"] = field.minimum
        if field.maximum is not None:
            schema["maximum"] = field.maximum
    if field.non_empty and kind in ("string", "array"):
        schema["minLength" if kind == "string" else "minItems"] = 1
    if kind == "array" and field.items is not None:
        schema["items"] = field.items.schema
    return schema
