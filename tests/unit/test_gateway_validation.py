"""The gateway's validation over loopback: bad requests, unknown models and paths, a model of the wrong task
and a model no replica can serve are refused in the OpenAI error shape, before any engine sees them (the full
path: test_gateway_inference.py; the admin API: test_gateway_admin.py; forwarding itself: test_gateway_relay.py,
test_gateway_retries.py and test_gateway_picks.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from nebula.core.model import Task
from nebula.services.gateway.state import GATEWAY
from tests.unit.fake_engine import put_instance, until
from tests.unit.gateway_api_fixtures import (
    CHAT,
    MakeStack,
    assert_openai_error,
    engine_fixture,  # noqa: F401 (the fixture engine, which make_stack takes)
    make_stack_fixture,  # noqa: F401 (the fixture make_stack)
    )

INVALID = [
    ("chat/completions", b"{not json", None),
    ("chat/completions", b"[1, 2]", None),
    ("chat/completions", b"", None),
    # Not JSON by RFC 8259, though json.loads takes the first (validation.parse_body).
    ("chat/completions", json.dumps({**CHAT, "temperature": float("nan")}).encode(), None),
    ("chat/completions", json.dumps(CHAT).encode().replace(b'"', b'"\xff', 1), None),  # not UTF-8
    ("chat/completions", b"[" * 5000 + b"]" * 5000, None),
    # An integer beyond 64 bits is read as a number that is not an integer.
    ("chat/completions", json.dumps({**CHAT, "max_tokens": 2**64}).encode(), "max_tokens"),
    ("chat/completions", json.dumps({"messages": CHAT["messages"]}).encode(), "model"),
    ("chat/completions", json.dumps({**CHAT, "model": 7}).encode(), "model"),
    ("chat/completions", json.dumps({**CHAT, "model": ""}).encode(), "model"),
    ("chat/completions", json.dumps({"model": "m"}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": "hi"}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": []}).encode(), "messages"),
    ("chat/completions", json.dumps({"model": "m", "messages": [{"content": "x"}]}).encode(),
     "messages[0].role"),
    ("chat/completions", json.dumps({**CHAT, "max_tokens": -1}).encode(), "max_tokens"),
    ("chat/completions", json.dumps({**CHAT, "max_tokens": True}).encode(), "max_tokens"),
    ("chat/completions", json.dumps({**CHAT, "stream": "yes"}).encode(), "stream"),
    ("chat/completions", json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature"),
    ("chat/completions", json.dumps({**CHAT, "top_p": 0}).encode(), "top_p"),
    ("chat/completions", json.dumps({**CHAT, "stop": [1]}).encode(), "stop"),
    ("completions", json.dumps({"model": "m"}).encode(), "prompt"),
    ("completions", json.dumps({"model": "m", "prompt": []}).encode(), "prompt"),
    ("completions", json.dumps({"model": "m", "prompt": [{"a": 1}]}).encode(), "prompt"),
    ("embeddings", json.dumps({"model": "e"}).encode(), "input"),
    ("embeddings", json.dumps({"model": "e", "input": "x", "encoding_format": "hex"}).encode(),
     "encoding_format"),
    ("rerank", json.dumps({"model": "r", "documents": ["d"]}).encode(), "query"),
    ("rerank", json.dumps({"model": "r", "query": "q"}).encode(), "documents"),
    ("rerank", json.dumps({"model": "r", "query": "q", "documents": []}).encode(), "documents"),
    ("score", json.dumps({"model": "r", "text_1": "q"}).encode(), "text_2"),
]


@pytest.mark.parametrize(("path", "raw", "param"), INVALID)
async def test_invalid_requests_get_400_in_openai_shape(make_stack: MakeStack, path: str, raw: bytes,
                                                        param: str | None) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", f"/v1/{path}", raw=raw)
    assert status == 400
    err = assert_openai_error(body, 400)
    assert err["param"] == param
    assert s.engine.received == []


async def test_oversized_body_is_413(make_stack: MakeStack) -> None:
    s = await make_stack(max_body_bytes=1024)
    status, _, body = await s.call("POST", "/v1/chat/completions", {**CHAT, "pad": "x" * 4096})
    assert status == 413
    assert_openai_error(body, 413, "request_too_large")


async def test_a_client_still_sending_a_too_big_body_reads_the_413(make_stack: MakeStack) -> None:
    # urllib-style: the whole body is written before the answer is read. Closing at once with the body
    # unread would make the kernel reset the connection, and the client would see a reset, not the 413.
    s = await make_stack(max_body_bytes=1024)
    body = b'{"pad": "' + b"x" * (4 << 20) + b'"}'

    def post() -> tuple[int, bytes]:
        request = urllib.request.Request(s.url("/v1/chat/completions"), data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, answer = await asyncio.to_thread(post)
    assert status == 413
    assert_openai_error(json.loads(answer), 413, "request_too_large")


async def test_unknown_model_is_404_model_not_found(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/chat/completions", {**CHAT, "model": "nope"})
    assert status == 404
    assert assert_openai_error(body, 404, "model_not_found")["param"] == "model"
    labels = {"model": "unknown", "endpoint": "chat/completions", "status": "404"}
    assert s.registry.get_sample_value("nebula_gateway_requests_total", labels) == 1


@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", {**CHAT, "model": "e"}),
    ("embeddings", {"model": "m", "input": "x"}),
    ("rerank", {"model": "e", "query": "q", "documents": ["d"]}),
])
async def test_model_of_the_wrong_task_is_400(make_stack: MakeStack, path: str, body: dict[str, Any]) -> None:
    s = await make_stack()
    status, _, got = await s.call("POST", f"/v1/{path}", body)
    assert status == 400
    assert assert_openai_error(got, 400, "model_not_supported")["param"] == "model"


async def test_unknown_path_and_wrong_method_keep_the_openai_shape(make_stack: MakeStack) -> None:
    s = await make_stack()
    status, _, body = await s.call("POST", "/v1/nothing-here", CHAT)
    assert status == 404
    assert_openai_error(body, 404, "not_found")
    status, _, body = await s.call("GET", "/v1/chat/completions")
    assert status == 405
    assert_openai_error(body, 405, "method_not_allowed")


async def test_ready_model_with_unreachable_engines_is_503(make_stack: MakeStack) -> None:
    s = await make_stack()
    await put_instance(s.store, "e", "http://127.0.0.1:1", model="e", task=Task.EMBED)
    await until(lambda: s.gateway.app[GATEWAY].table.ready()["e"][0].endpoint == "http://127.0.0.1:1")
    status, headers, body = await s.call("POST", "/v1/embeddings", {"model": "e", "input": "x"})
    assert status == 503 and headers["Retry-After"]
    assert_openai_error(body, 503, "service_unavailable")


async def test_model_with_no_ready_replica_is_503(make_stack: MakeStack) -> None:
    s = await make_stack()
    rerank = {"model": "r", "query": "q", "documents": ["d"]}
    status, headers, body = await s.call("POST", "/v1/rerank", rerank)
    assert status == 503 and headers["Retry-After"] == "1"
    assert_openai_error(body, 503, "model_not_ready")
