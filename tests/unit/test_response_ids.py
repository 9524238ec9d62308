"""Response ids that name their replica (core/response_ids.py), and the gateway's request checks for the
Responses API and the tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.model import InstanceStatus, Phase
from nebula.core.response_ids import replica_token, response_id, token_of, with_request_id
from nebula.core.routing import ready_replicas
from nebula.errors import ValidationError
from nebula.services.gateway.validation import ENDPOINTS, check_request

HEX = "0123456789abcdef"
tokens = st.text(HEX, min_size=16, max_size=16)
randoms = st.text(HEX, min_size=32, max_size=32)
RID = response_id("0123456789abcdef", "f" * 32)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)
bodies = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "request_id"), json_values, min_size=1,
                         max_size=5)
spaces = st.text(" \t\r\n", max_size=3)


@given(tokens, randoms)
def test_an_id_gives_back_its_token(token: str, random: str) -> None:
    rid = response_id(token, random)
    assert token_of(rid) == token
    assert rid.startswith("resp_") and rid.isascii() and all(c.isalnum() or c == "_" for c in rid)  # URL-safe


@pytest.mark.parametrize("rid", ["", "resp_", "resp_abc", f"{RID}x", f" {RID}", RID.upper(), "resp_" + "0" * 49,
                                 RID.replace("_", "-"), f"{RID}/cancel", None, 7])
def test_anything_else_has_no_token(rid: object) -> None:
    assert token_of(rid) is None


def test_an_id_needs_a_token_and_enough_randomness() -> None:
    with pytest.raises(ValueError):
        response_id("short", "f" * 32)
    with pytest.raises(ValueError):
        response_id("0" * 16, "f" * 8)


def test_the_token_names_one_incarnation() -> None:
    token = replica_token("m:1", "n1", "http://10.0.0.1:8001", 0)
    assert token == replica_token("m:1", "n1", "http://10.0.0.1:8001", 0)  # any gateway computes the same
    assert len(token) == 16 and set(token) <= set(HEX)
    ep = "http://10.0.0.1:8001"
    others = {replica_token("m:2", "n1", ep, 0), replica_token("m:1", "n2", ep, 0),
              replica_token("m:1", "n1", "http://10.0.0.1:8002", 0), replica_token("m:1", "n1", ep, 1),
              replica_token("m:1n", "1", ep, 0)}  # length-prefixed parts: moving a boundary is another token
    assert token not in others and len(others) == 5


def test_ready_replicas_carry_their_incarnation() -> None:
    def status(restarts: int) -> InstanceStatus:
        return InstanceStatus(instance="m", model="m", node="n1", phase=Phase.READY, endpoint="http://h:1/",
                              restarts=restarts)

    before, after = ready_replicas([status(0)])["m"][0], ready_replicas([status(1)])["m"][0]
    assert before.incarnation == replica_token("m", "n1", "http://h:1", 0)
    assert after.incarnation != before.incarnation  # a restarted engine lost its store: its old ids are gone
    assert before == after  # still the same replica for routing and load tracking


@given(bodies, spaces, spaces, st.booleans())
def test_the_request_id_is_added_and_nothing_else_changes(body: dict[str, Any], lead: str, trail: str,
                                                          pretty: bool) -> None:
    raw = (lead + json.dumps(body, indent=2 if pretty else None) + trail).encode()
    out = with_request_id(raw, body, RID)
    assert json.loads(out) == {**body, "request_id": RID}
    stripped = raw.rstrip(b" \t\r\n")
    assert out.startswith(stripped[:-1])  # the client's bytes, byte for byte, then the new field
    assert out.endswith(b',"request_id":"%s"}%s' % (RID.encode(), trail.encode()))


@given(bodies, st.text(max_size=10))
def test_the_client_s_request_id_is_replaced(body: dict[str, Any], theirs: str) -> None:
    body = {**body, "request_id": theirs}
    out = with_request_id(json.dumps(body).encode(), body, RID)
    assert json.loads(out) == {**body, "request_id": RID}
    assert out.count(b'"request_id"') == 1  # not a duplicate key, whose winner depends on the parser


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_body_in_another_encoding_is_encoded_again(encoding: str) -> None:
    body = {"model": "m", "input": "héllo ☃"}
    raw = json.dumps(body, ensure_ascii=False).encode(encoding)
    assert json.loads(raw) == body  # what the gateway parsed
    assert json.loads(with_request_id(raw, body, RID)) == {**body, "request_id": RID}


def test_only_a_response_id_is_set() -> None:
    with pytest.raises(ValueError):
        with_request_id(b'{"a":1}', {"a": 1}, 'x","model":"other')


RESPONSES = {"model": "m", "input": "hi"}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("responses", {"model": "m"}, "input"),
    ("responses", {"model": "m", "input": 7}, "input"),
    ("responses", {"input": "hi"}, "model"),
    ("responses", {**RESPONSES, "previous_response_id": 7}, "previous_response_id"),
    ("responses", {**RESPONSES, "stream": "yes"}, "stream"),
    ("responses", {**RESPONSES, "store": 1}, "store"),
    ("responses", {**RESPONSES, "tools": {"type": "function"}}, "tools"),
    ("responses", {**RESPONSES, "tools": ["get_weather"]}, "tools"),
    ("responses", {**RESPONSES, "max_output_tokens": 0}, "max_output_tokens"),
    ("responses", {**RESPONSES, "instructions": ["be brief"]}, "instructions"),
    ("tokenize", {"model": "m"}, "prompt"),
    ("tokenize", {"model": "m", "prompt": ["a"]}, "prompt"),
    ("tokenize", {"model": "m", "messages": "hi"}, "messages"),
    ("tokenize", {"model": "m", "prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
    ("detokenize", {"model": "m"}, "tokens"),
    ("detokenize", {"model": "m", "tokens": [1, -2]}, "tokens"),
    ("detokenize", {"model": "m", "tokens": [1, True]}, "tokens"),
    ("detokenize", {"model": "m", "tokens": "1 2"}, "tokens"),
])
def test_bad_requests_name_their_field(path: str, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        check_request(ENDPOINTS[path], body)
    assert e.value.field == field


@pytest.mark.parametrize(("path", "body"), [
    ("responses", RESPONSES),
    ("responses", {"model": "m", "input": [{"role": "user", "content": "hi"}], "previous_response_id": RID,
                   "stream": True, "tools": [{"type": "function", "name": "f", "parameters": {}}],
                   "tool_choice": {"type": "function", "name": "f"}, "request_id": 5, "unknown": [1]}),
    ("tokenize", {"model": "m", "prompt": "hello"}),
    ("tokenize", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}),
    ("detokenize", {"model": "m", "tokens": [1, 2, 3]}),
])
def test_good_requests_pass(path: str, body: dict[str, Any]) -> None:
    assert check_request(ENDPOINTS[path], body) == "m"


def test_the_tokenizer_is_served_under_both_spellings_for_any_task() -> None:
    assert ENDPOINTS["tokenize"].paths == ("/v1/tokenize", "/tokenize")
    assert ENDPOINTS["detokenize"].paths == ("/v1/detokenize", "/detokenize")
    assert ENDPOINTS["tokenize"].task is None
    assert ENDPOINTS["responses"].paths == ("/v1/responses",)
