"""Anthropic's Messages API at the gateway, against a real HTTP engine stand-in: the real `anthropic` SDK
(key in x-api-key, errors it maps to its own exception classes), Anthropic's error shape on /v1/messages
from both of the gateway's servers, the key never forwarded, vision content parts passed through byte for
byte, and the 404 that lists the served paths. The real engine's answers are tested in
tests/integration/test_messages_api.py."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, Task, dumps
from nebula.errors import ValidationError
from nebula.services.gateway.messages_validation import check_count_tokens, check_messages
from tests.unit.fake_engine import FakeEngine, put_instance
from tests.unit.served_gateway import ServedGateway, served_gateway

KEY = "inference-key"
ADMIN = "admin-key"
MAX_BODY = 64 * 1024
HELLO = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServedGateway, FakeEngine]]:
    engine = FakeEngine("a")

    async def prepare(store: MemoryStore) -> None:
        endpoint = await engine.start()
        for name, task in (("m", Task.GENERATE), ("e", Task.EMBED)):
            await store.put(keys.model_key(name), dumps(ModelSpec(name=name, source="/models/x", task=task).to_dict()))
            await put_instance(store, name, endpoint, model=name, task=task)

    cfg = GatewayConfig(admin_key_hashes=(_sha(ADMIN),), api_key_hashes=(_sha(KEY),), load_poll_s=0,
                        max_body_bytes=MAX_BODY)
    with served_gateway(cfg, prepare, engine.stop) as gateway:
        yield gateway, engine


@pytest.fixture
def client(served: tuple[ServedGateway, FakeEngine]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served[0].url, api_key=KEY, max_retries=0, timeout=10)


def _post(url: str, path: str, body: bytes, headers: dict[str, str], chunked: bool = False
          ) -> tuple[int, dict[str, Any]]:
    """POST with http.client; `chunked` sends the body chunked, which the data-plane server hands to aiohttp."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        if chunked:
            conn.request("POST", path, body=iter([body]), headers={**headers, "Transfer-Encoding": "chunked"},
                         encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _anthropic_error(body: dict[str, Any], kind: str) -> str:
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    message: str = body["error"]["message"]
    return message


# --- the real SDK -----------------------------------------------------------------------------------------

def test_the_sdk_sends_its_key_in_x_api_key_and_it_is_not_forwarded(
        client: anthropic.Anthropic, served: tuple[ServedGateway, FakeEngine]) -> None:
    engine = served[1]
    before = len(engine.received)
    message = client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text == "hello from a"
    received = engine.received[before]
    assert received.path == "/v1/messages"
    assert "x-api-key" not in received.headers and "authorization" not in received.headers
    assert received.headers.get("anthropic-version"), "the SDK's version header reaches the engine"


def test_sdk_errors_map_to_its_exception_classes(served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway = served[0]
    wrong = anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "invalid API key"}}
    good = anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=10)
    with pytest.raises(anthropic.NotFoundError) as missing:
        good.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert "'nope'" in str(missing.value)
    with pytest.raises(anthropic.BadRequestError) as task:
        good.messages.create(model="e", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert "serves task 'embed'" in str(task.value)
    with pytest.raises(anthropic.BadRequestError) as bad:
        good.messages.count_tokens(model="m", messages=[])
    assert "messages" in str(bad.value)


def test_claude_codes_beta_query_and_headers_reach_the_engine(served: tuple[ServedGateway, FakeEngine]) -> None:
    # Claude Code posts to /v1/messages?beta=true with anthropic-beta headers.
    gateway, engine = served
    before = len(engine.received)
    status, body = _post(gateway.url, "/v1/messages?beta=true", json.dumps(HELLO).encode(),
                         {"x-api-key": KEY, "anthropic-beta": "tools-2024-05-16", "anthropic-version": "2023-06-01"})
    assert status == 200 and body["type"] == "message", body
    received = engine.received[before]
    assert received.path == "/v1/messages?beta=true"
    assert received.headers["anthropic-beta"] == "tools-2024-05-16"


# --- the error shape from both servers --------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["data-plane", "aiohttp"])
@pytest.mark.parametrize(("body", "status", "kind", "words"), [
    (b"{not json", 400, "invalid_request_error", "JSON"),
    (json.dumps({**HELLO, "max_tokens": "8"}).encode(), 400, "invalid_request_error", "max_tokens"),
    (json.dumps({k: v for k, v in HELLO.items() if k != "max_tokens"}).encode(), 400, "invalid_request_error",
     "max_tokens"),
    (json.dumps({**HELLO, "messages": [{"role": "tool", "content": "x"}]}).encode(), 400,
     "invalid_request_error", "role"),
    (json.dumps({**HELLO, "tools": [{"name": "f"}]}).encode(), 400, "invalid_request_error", "input_schema"),
    (json.dumps({**HELLO, "model": "nope"}).encode(), 404, "not_found_error", "nope"),
])
def test_bad_input_gets_anthropics_shape(served: tuple[ServedGateway, FakeEngine], chunked: bool, body: bytes,
                                          status: int, kind: str, words: str) -> None:
    got, answer = _post(served[0].url, "/v1/messages", body,
                        {"x-api-key": KEY, "Content-Type": "application/json"}, chunked)
    assert got == status, answer
    assert words in _anthropic_error(answer, kind)


@pytest.mark.parametrize("chunked", [False, True], ids=["data-plane", "aiohttp"])
def test_refusals_before_the_route_get_anthropics_shape(served: tuple[ServedGateway, FakeEngine],
                                                         chunked: bool) -> None:
    url = served[0].url
    status, body = _post(url, "/v1/messages", json.dumps(HELLO).encode(), {}, chunked)
    assert status == 401 and "x-api-key" in _anthropic_error(body, "authentication_error")
    status, body = _post(url, "/v1/messages", json.dumps(HELLO).encode(), {"x-api-key": "no"}, chunked)
    assert status == 401 and _anthropic_error(body, "authentication_error") == "invalid API key"
    big = json.dumps({**HELLO, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    status, body = _post(url, "/v1/messages", big, {"x-api-key": KEY}, chunked)
    assert status == 413 and "max_body_bytes" in _anthropic_error(body, "invalid_request_error")


def test_openai_paths_keep_openais_shape_and_take_x_api_key(served: tuple[ServedGateway, FakeEngine]) -> None:
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    status, body = _post(served[0].url, "/v1/chat/completions", json.dumps(chat).encode(), {"x-api-key": KEY})
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    status, body = _post(served[0].url, "/v1/chat/completions", json.dumps(chat).encode(), {"x-api-key": "no"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body


# --- vision inputs and unknown paths ----------------------------------------------------------------------

def test_image_url_parts_pass_through_byte_for_byte_and_the_body_limit_applies(
        served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway, engine = served
    png = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAF"
           "BQIAX8jx0gAAAABJRU5ErkJggg==")  # a 1x1 PNG
    chat = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": png}}]}]}
    raw = json.dumps(chat, separators=(",", ":")).encode()
    before = len(engine.received)
    status, _ = _post(gateway.url, "/v1/chat/completions", raw, {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    assert engine.received[before].body == raw
    huge = {**chat, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * MAX_BODY}}]}]}
    status, body = _post(gateway.url, "/v1/chat/completions", json.dumps(huge).encode(),
                         {"Authorization": f"Bearer {KEY}"})
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert len(engine.received) == before + 1


def test_an_engine_path_the_gateway_does_not_serve_is_a_404_listing_what_it_serves(
        served: tuple[ServedGateway, FakeEngine]) -> None:
    gateway, engine = served
    before = len(engine.received)
    for path in ("/v1/load_lora_adapter", "/v1/no-such-thing"):
        status, body = _post(gateway.url, path, b'{"lora_name": "x", "lora_path": "/tmp"}',
                             {"Authorization": f"Bearer {KEY}"})
        assert status == 404, body
        message = body["error"]["message"]
        assert f"POST {path} is not served" in message
        for served_path in ("POST /v1/chat/completions", "POST /v1/messages", "GET /v1/models"):
            assert served_path in message
        assert "/v1/admin/" not in message
    assert len(engine.received) == before, "an unserved path reached an engine"


# --- the pure checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": True, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "system": 3}, "system"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "stop_sequences": [1]}, "stop_sequences"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}},
     "tool_choice.name"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "some"}},
     "tool_choice.type"),
])
def test_check_messages_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        check_messages(body)
    assert e.value.field == field


def test_valid_requests_pass() -> None:
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    body = {"max_tokens": 4, "system": [{"type": "text", "text": "be brief"}], "tools": [tool],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                                            "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "9"}]}]}
    check_messages(body)
    check_count_tokens({k: v for k, v in body.items() if k != "max_tokens"})
    check_messages({**body, "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
