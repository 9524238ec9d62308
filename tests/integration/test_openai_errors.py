"""Errors through Nebula (gateway -> vLLM CPU engines): the wrong endpoint for a model's task, the engine's own
errors passed through, and bad input refused by the gateway in the OpenAI error shape before any engine sees it
(the cluster and the fixtures: openai_api_fixtures.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import openai
import pytest

from tests.harness.cluster import post_json
from tests.integration.api_fixtures import CHAT_MODEL, EMBED_MODEL, MAX_MODEL_LEN, RERANK_MODEL, ApiCluster
from tests.integration.openai_api_fixtures import (
    HELLO,
    client_fixture,  # noqa: F401 (the fixture client)
    gateway_fixture,  # noqa: F401 (the fixture gateway)
)

pytestmark = [pytest.mark.engine, pytest.mark.etcd]


def assert_error_shape(status: int, body: Mapping[str, Any], expected_status: int) -> dict[str, Any]:
    """The OpenAI error shape `{"error": {"message", "type", "param", "code"}}` with the expected status."""
    assert status == expected_status, f"expected {expected_status}, got {status}: {body}"
    assert set(body) == {"error"}, f"not the OpenAI error shape: {body}"
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), f"error lacks OpenAI fields: {error}"
    assert isinstance(error["message"], str) and error["message"], f"empty error message: {error}"
    assert isinstance(error["type"], str) and error["type"], f"empty error type: {error}"
    return error


# --- the wrong endpoint for a model's task: a clear 400 from the gateway -----------------------------

WRONG_TASK: list[tuple[str, str, dict[str, Any]]] = [
    ("chat/completions", EMBED_MODEL, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("completions", RERANK_MODEL, {"prompt": "hi", "max_tokens": 4}),
    ("embeddings", CHAT_MODEL, {"input": "hi"}),
    ("rerank", CHAT_MODEL, {"query": "q", "documents": ["d"]}),
    ("score", EMBED_MODEL, {"text_1": "q", "text_2": ["d"]}),
]


@pytest.mark.parametrize(("path", "model", "fields"), WRONG_TASK, ids=[f"{p}->{m}" for p, m, _ in WRONG_TASK])
def test_endpoint_the_model_does_not_serve(gateway: str, path: str, model: str, fields: dict[str, Any]) -> None:
    status, body = post_json(f"{gateway}/v1/{path}", {"model": model, **fields})
    error = assert_error_shape(status, body, 400)
    assert error["code"] == "model_not_supported" and error["param"] == "model", error
    assert f"/v1/{path}" in error["message"] and model in error["message"], error["message"]


def test_wrong_task_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=EMBED_MODEL, messages=HELLO, max_tokens=4)
    assert exc.value.status_code == 400 and "task" in exc.value.message


# --- upstream engine errors pass through ------------------------------------------------------------


def test_engine_error_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=MAX_MODEL_LEN * 100)
    assert exc.value.status_code == 400
    assert "max_model_len" in exc.value.message and str(MAX_MODEL_LEN * 100) in exc.value.message, (
        f"not vLLM's own message: {exc.value.message}")


def test_engine_error_passes_through_on_a_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=MAX_MODEL_LEN * 100,
                                       stream=True)
    assert exc.value.status_code == 400 and "max_model_len" in exc.value.message, exc.value.message


def test_engine_validation_of_an_unknown_field_passes_through(gateway: str) -> None:
    status, body = post_json(gateway + "/v1/chat/completions", {"model": CHAT_MODEL, "messages": HELLO,
                                                           "max_tokens": 5, "min_tokens": 10})
    error = assert_error_shape(status, body, 400)
    assert "min_tokens must be less than or equal to" in error["message"], error


# --- bad input: the OpenAI error shape, the right 4xx -----------------------------------------------

CHAT_OK: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_INPUT: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed-json", b'{"model": "chat", "messages": [', 400, None),
    ("not-an-object", b"[1, 2]", 400, None),
    ("not-utf8", b"\xff\xfe", 400, None),
    ("deeply-nested-json", b"[" * 100_000, 400, None),
    ("missing-model", {k: v for k, v in CHAT_OK.items() if k != "model"}, 400, "model"),
    ("missing-messages", {"model": CHAT_MODEL, "max_tokens": 4}, 400, "messages"),
    ("messages-wrong-type", {**CHAT_OK, "messages": "hi"}, 400, "messages"),
    ("negative-max-tokens", {**CHAT_OK, "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-string", {**CHAT_OK, "max_tokens": "4"}, 400, "max_tokens"),
    ("unknown-model", {**CHAT_OK, "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input(gateway: str, body: bytes | dict[str, Any], status: int, param: str | None) -> None:
    got, answer = post_json(gateway + "/v1/chat/completions", body)
    error = assert_error_shape(got, answer, status)
    if param is not None:
        assert error["param"] == param, f"param {error['param']!r}, expected {param!r}: {error}"


def replica_picks(gateway_url: str) -> float:
    """Total replica picks the gateway made (one per request it forwarded to an engine)."""
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nebula_gateway_picks_total"))


def test_rejected_requests_never_reach_an_engine(api_cluster: ApiCluster) -> None:
    gateway = api_cluster.gateway_url
    before = replica_picks(gateway)
    for what, body, _, _ in BAD_INPUT:  # their statuses are test_bad_input's concern
        assert post_json(gateway + "/v1/chat/completions", body)[0] >= 400, f"{what} was accepted"
    for path, model, fields in WRONG_TASK:
        assert post_json(f"{gateway}/v1/{path}", {"model": model, **fields})[0] >= 400, f"{path} -> {model} accepted"
    assert replica_picks(gateway) == before, "a rejected request was forwarded to an engine"
    client_ok = post_json(gateway + "/v1/chat/completions", CHAT_OK)
    assert client_ok[0] == 200
    assert replica_picks(gateway) == before + 1, "the picks metric does not count picks"


def test_unknown_path_and_wrong_method(gateway: str) -> None:
    status, body = post_json(gateway + "/v1/no-such-endpoint", CHAT_OK)
    assert_error_shape(status, body, 404)
    try:
        urllib.request.urlopen(gateway + "/v1/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert_error_shape(e.code, json.loads(e.read()), 405)
    else:
        raise AssertionError("GET /v1/chat/completions was answered")


def test_oversized_body_is_413(gateway: str) -> None:
    big = {**CHAT_OK, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    status, body = post_json(gateway + "/v1/chat/completions", big)
    error = assert_error_shape(status, body, 413)
    assert error["code"] == "request_too_large", error


def test_unknown_model_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="no-such-model", input="hi")
    assert exc.value.status_code == 404 and "no-such-model" in exc.value.message
