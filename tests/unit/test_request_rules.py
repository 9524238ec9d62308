"""The inference endpoints' request rules (request_rules.py) hold the checks and GET /openapi.json together:
every rule in a table is rendered into the document, and every body the checks refuse, the document's
schema refuses too (and what one takes, the other takes), so the two cannot drift apart.

The bodies that break a rule are made from the rule itself, so a new field or bound is covered unasked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest

from nebula.errors import ValidationError
from nebula.services.gateway.messages_validation import BLOCKS, TOOL_CHOICE
from nebula.services.gateway.openapi import openapi_document
from nebula.services.gateway.request_rules import Custom, Field, body_schema
from nebula.services.gateway.validation import ENDPOINTS, PROMPT, check_request

CHAT_MESSAGES = [{"role": "user", "content": "hi"}]

# One valid body per shape of each endpoint, the shape its rules pick for it.
VALID: dict[str, list[dict[str, Any]]] = {
    "chat/completions": [{"model": "m", "messages": CHAT_MESSAGES}],
    "completions": [{"model": "m", "prompt": "hi"}],
    "embeddings": [{"model": "e", "input": ["a", "b"]}],
    "rerank": [{"model": "r", "query": "q", "documents": ["d"]}],
    "score": [{"model": "r", "text_1": "a", "text_2": ["b"]}, {"model": "r", "queries": "a", "documents": ["b"]}],
    "messages": [{"model": "m", "max_tokens": 4, "messages": CHAT_MESSAGES}],
    "messages/count_tokens": [{"model": "m", "messages": CHAT_MESSAGES}],
    "responses": [{"model": "m", "input": "hi"}],
    "tokenize": [{"model": "m", "prompt": "hi"}, {"model": "m", "messages": CHAT_MESSAGES}],
    "detokenize": [{"model": "m", "tokens": [1, 2]}],
}

# Values each irregular rule refuses, beside the field its error names (a custom check may name a part).
CUSTOM_BREAKS: dict[Custom, list[tuple[Any, str]]] = {
    PROMPT: [([], ""), ([{"a": 1}], ""), ([[]], ""), ([1, "a"], ""), ([-1], "")],
    BLOCKS: [(7, ""), ([{"text": "x"}], "[0]"), (["x"], "[0]")],
    TOOL_CHOICE: [({"type": "some"}, ".type"), ({"type": "tool"}, ".name")],
}

_ANY_VALUES: list[Any] = ["x", 7, 1.5, True, [], {}]


def _fields() -> Iterator[tuple[str, int, Field]]:
    for path, endpoint in ENDPOINTS.items():
        for i, shape in enumerate(endpoint.rules.shapes):
            for field in shape.fields:
                yield path, i, field


FIELDS = list(_fields())
IDS = [f"{path}#{i}.{field.name}" for path, i, field in FIELDS]


def _breaks(field: Field) -> Iterator[tuple[Any, str]]:
    """Values that break `field`'s rule, each with the field name its error must carry."""
    name = field.name
    # bool is an int in Python, not in JSON: true is never a count.
    yield from ((v, name) for v in _ANY_VALUES if field.types and not (
        isinstance(v, field.types) and (bool in field.types or not isinstance(v, bool))))
    if field.minimum is not None:
        yield (field.minimum if field.exclusive_minimum else field.minimum - 1), name
    if field.maximum is not None:
        yield field.maximum + 1, name
    if field.enum:
        yield f"not-{field.enum[0]}", name
    if field.non_empty:
        empties: tuple[Any, ...] = ("", [])
        yield from ((empty, name) for empty in empties if isinstance(empty, field.types))
    if field.items is not None:
        if field.items.ok is not None:
            yield [next(v for v in (1, -1, "x") if not field.items.ok(v))], name
        if field.items.check is not None:
            yield [7], f"{name}[0]"
    if field.custom is not None:
        yield from ((value, name + part) for value, part in CUSTOM_BREAKS[field.custom])


def _valid(path: str, shape: int) -> dict[str, Any]:
    body = dict(VALID[path][shape])
    assert ENDPOINTS[path].rules.pick(body) == shape
    return body


def _schema_takes(path: str, body: dict[str, Any]) -> bool:
    return bool(jsonschema_rs.validator_for(body_schema(ENDPOINTS[path].rules)).is_valid(body))


def test_every_endpoint_and_shape_has_a_valid_body() -> None:
    assert set(VALID) == set(ENDPOINTS)
    for path, endpoint in ENDPOINTS.items():
        assert len(VALID[path]) == len(endpoint.rules.shapes), path


@pytest.mark.parametrize("path", list(VALID))
def test_valid_bodies_pass_the_checks_and_the_schema(path: str) -> None:
    for shape in range(len(VALID[path])):
        body = _valid(path, shape)
        assert check_request(ENDPOINTS[path], body) == body["model"]
        assert _schema_takes(path, body)


def test_every_rule_is_in_the_served_document() -> None:
    document = openapi_document()["paths"]
    for path, endpoint in ENDPOINTS.items():
        rendered = body_schema(endpoint.rules)
        for route in endpoint.paths:
            assert document[route]["post"]["requestBody"]["content"]["application/json"]["schema"] == rendered
        shapes = [rendered] if len(endpoint.rules.shapes) == 1 else rendered[endpoint.rules.combine]
        for shape, schema in zip(endpoint.rules.shapes, shapes, strict=True):
            assert set(schema["properties"]) == {"model"} | {f.name for f in shape.fields}, path
            assert set(schema["required"]) == {"model"} | {f.name for f in shape.fields if f.required}, path


@pytest.mark.parametrize(("path", "shape", "field"), FIELDS, ids=IDS)
def test_a_body_breaking_a_rule_is_refused_by_the_check_and_the_schema(path: str, shape: int, field: Field) -> None:
    breaks = list(_breaks(field))
    assert breaks or not field.types, f"{field.name}: no rule to break"
    for value, name in breaks:
        body = {**_valid(path, shape), field.name: value}
        with pytest.raises(ValidationError) as e:
            check_request(ENDPOINTS[path], body)
        assert e.value.field == name, (value, e.value)
        assert not _schema_takes(path, body), f"the document takes {field.name}={value!r}, the check does not"


@pytest.mark.parametrize(("path", "shape", "field"), FIELDS, ids=IDS)
def test_a_missing_field_is_refused_by_both_only_when_required(path: str, shape: int, field: Field) -> None:
    body = {k: v for k, v in _valid(path, shape).items() if k != field.name}
    if field.required:
        with pytest.raises(ValidationError) as e:
            check_request(ENDPOINTS[path], body)
        assert e.value.field == field.name or ENDPOINTS[path].rules.pick(body) != shape
        assert not _schema_takes(path, body)
    else:
        # JSON null is absent to the checks, and the schema says so.
        for absent in (body, {**body, field.name: None}):
            check_request(ENDPOINTS[path], absent)
            assert _schema_takes(path, absent)


@pytest.mark.parametrize(("path", "shape", "field"), [f for f in FIELDS if f[2].minimum is not None],
                         ids=[i for i, f in zip(IDS, FIELDS, strict=True) if f[2].minimum is not None])
def test_bounds_take_the_same_edges(path: str, shape: int, field: Field) -> None:
    assert field.minimum is not None
    edges = [field.minimum + (0.5 if field.exclusive_minimum else 0)] + (
        [field.maximum] if field.maximum is not None else [])
    for edge in edges:
        value = int(edge) if field.types == (int,) else edge
        body = {**_valid(path, shape), field.name: value}
        check_request(ENDPOINTS[path], body)
        assert _schema_takes(path, body), f"{field.name}={value}"


def test_score_s_newer_spelling_is_refused_beside_the_older_one() -> None:
    body = {"model": "r", "text_1": "a", "queries": "q", "documents": ["d"]}
    with pytest.raises(ValidationError) as e:
        check_request(ENDPOINTS["score"], body)
    assert e.value.field == "text_2"
    assert not _schema_takes("score", body)


def test_custom_rules_have_their_schema_beside_them() -> None:
    customs = {f.custom for _, _, f in FIELDS if f.custom is not None}
    assert customs == set(CUSTOM_BREAKS)
