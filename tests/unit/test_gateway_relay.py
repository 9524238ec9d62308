"""The gateway's relay over loopback: MemoryStore -> gateway -> real aiohttp fake engines. Answers and
streams byte-exact, the headers forwarded, a client that leaves, a timeout, and the production runner (picks:
test_gateway_picks.py; retries: test_gateway_retries.py; validation, keys and the admin API:
test_gateway_validation.py, test_gateway_inference.py and test_gateway_admin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.services.gateway.app import serve_gateway
from nebula.services.http.relay import forward_headers, skipped_with
from tests.unit.fake_engine import FakeEngine, completion_bytes, put_instance, sse_chunks, until
from tests.unit.gateway_forward_fixtures import (
    CHAT,
    CHAT_STREAM,
    MakeGateway,
    closed_port_endpoint,
    make_gateway_fixture,  # noqa: F401 (the fixture make_gateway)
    put_model,
    two_fixture,  # noqa: F401 (the fixture two)
)


async def test_non_stream_is_proxied_byte_exact(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
    a = two[0]
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT, path="/v1/chat/completions?x=1",
                      headers={"Authorization": "Bearer s3cret", "X-Request-Id": "req-1"}) as resp:
        assert resp.status == 200
        assert await resp.read() == completion_bytes("a", "m")
        assert resp.headers["X-Engine"] == "a"
    got = a.received[-1]
    assert got.body == CHAT and got.path == "/v1/chat/completions?x=1"
    assert got.headers["X-Request-Id"] == "req-1"
    assert "Authorization" not in got.headers
    assert r.metric("nebula_gateway_picks_total", {"model": "m", "instance": "m"}) == 1


async def test_sse_stream_is_relayed_byte_exact_as_it_arrives(make_gateway: MakeGateway,
                                                              two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT_STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        pieces = [chunk async for chunk in resp.content.iter_any()]
    assert b"".join(pieces) == b"".join(sse_chunks("a", "m"))
    assert len(pieces) > 1  # streamed as the engine wrote it, not buffered into one body


async def test_client_disconnect_cancels_the_upstream_request(make_gateway: MakeGateway,
                                                              two: list[FakeEngine]) -> None:
    r = await make_gateway()
    a = two[0]
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.wait_for(a.held.wait(), 5.0)
    request.cancel()  # drops the client connection
    await asyncio.wait_for(a.cancelled.wait(), 5.0)
    await until(lambda: r.table.inflight(a.endpoint) == 0)


async def test_timeout_before_the_answer_is_504(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway(upstream_timeout_s=0.2)
    a = two[0]
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "timeout"
    await until(lambda: r.table.inflight(a.endpoint) == 0)


async def test_serve_gateway_notifies_and_cancels_upstream_when_the_client_leaves(
        tmp_path: Path, two: list[FakeEngine]) -> None:
    # The production runner, not GatewayServer: aiohttp only cancels handlers of departed clients when the
    # runner is built with handler_cancellation=True, which is what this checks.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        store = MemoryStore()
        await put_model(store)
        a = two[0]
        a.hold = asyncio.Event()
        await put_instance(store, "m", a.endpoint)
        port = int(closed_port_endpoint().rsplit(":", 1)[1])
        serving = asyncio.create_task(serve_gateway(NebulaConfig(gateway=GatewayConfig(port=port)), store,
                                                    CollectorRegistry(), notifier))
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0)
            assert ready.startswith(b"READY=1")
            async with aiohttp.ClientSession() as http:
                async def replicas() -> bool:
                    async with http.get(f"http://127.0.0.1:{port}/v1/admin/replicas") as resp:
                        return bool((await resp.json())["models"].get("m", {}).get("ready"))

                await until(replicas)
                request = asyncio.create_task(http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT).__aenter__())
                await asyncio.wait_for(a.held.wait(), 5.0)
                request.cancel()
                await asyncio.wait_for(a.cancelled.wait(), 5.0)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            notifier.close()
        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0) == b"STOPPING=1"


def test_forwarded_headers_are_end_to_end_only_and_json() -> None:
    sent = CIMultiDict([("Host", "gw"), ("Authorization", "Bearer k"), ("content-type", "text/plain"),
                        ("Cookie", "nebula_console=t"), ("X-Nebula-CSRF", "c"),
                        ("X-Tag", "a"), ("X-Tag", "b"), ("Connection", "keep-alive"), ("Content-Length", "2")])
    assert forward_headers(sent, {"Content-Type": "application/json"}) == {
        "X-Tag": "a, b", "Accept-Encoding": "identity", "Content-Type": "application/json"}
    assert forward_headers(CIMultiDict([("accept-encoding", "gzip")]))["accept-encoding"] == "gzip"


def test_a_skip_set_made_once_forwards_what_one_made_per_call_does() -> None:
    # openai_api makes its skip set once: a client's own X-Request-ID or content-type, in any case, must still
    # give way to the gateway's, leaving one field of each.
    sent = CIMultiDict([("x-request-id", "client"), ("CONTENT-TYPE", "text/plain"), ("X-Tag", "a"),
                        ("Authorization", "Bearer k")])
    extra = {"Content-Type": "application/json", "X-Request-ID": "gw"}
    once = forward_headers(sent, extra, skipped_with(*extra))
    assert once == forward_headers(sent, extra) == {
        "X-Tag": "a", "Accept-Encoding": "identity", "Content-Type": "application/json", "X-Request-ID": "gw"}


async def test_a_connection_aiohttp_takes_over_keeps_serving_inference(make_gateway: MakeGateway,
                                                                       two: list[FakeEngine]) -> None:
    # The openai client keeps one connection for everything: an admin or /healthz call in the middle
    # hands it to aiohttp, whose OpenAI routes then answer the same way (request id, relay, streaming).
    r = await make_gateway(load_poll_s=0)
    a = two[0]
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    site = r.server.site
    assert site is not None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        async def chat_on(path: str = "/v1/chat/completions", body: bytes = CHAT) -> tuple[str, bytes]:
            async with http.post(r.url(path), data=body, headers={"X-Request-ID": "req-1"}) as resp:
                assert resp.status == 200, await resp.text()
                return resp.headers["X-Request-ID"], await resp.read()

        assert (await chat_on())[0] == "req-1"
        assert site.connections == 1  # on the data-plane server
        async with http.get(r.url("/healthz")) as resp:
            assert resp.status == 200
        assert site.connections == 0  # aiohttp's now
        rid, body = await chat_on()
        assert rid == "req-1" and json.loads(body)["object"] == "chat.completion"
        rid, body = await chat_on(body=CHAT_STREAM)
        assert rid == "req-1" and body.rstrip().endswith(b"data: [DONE]")
        async with http.post(r.url("/v1/chat/completions"), data=b"{not json") as resp:
            assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    assert [m.headers["X-Request-ID"] for m in a.received] == ["req-1"] * 3


async def test_big_request_heads_get_the_openai_error_shape(make_gateway: MakeGateway) -> None:
    r = await make_gateway(load_poll_s=0)
    async with r.post(CHAT, headers={"X-Padding": "x" * 70_000}) as resp:
        assert resp.status == 431
        error = (await resp.json())["error"]
        assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
