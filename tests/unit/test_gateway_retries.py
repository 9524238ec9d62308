"""The gateway's retries over loopback: an engine that refuses, dies, breaks off or answers 503 before the
client saw a byte is replayed on another replica; what the client gets when no replica can answer (the relay
itself: test_gateway_relay.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from nebula.core.model import Phase
from tests.unit.fake_engine import FakeEngine, completion_bytes, put_instance, sse_chunks, until
from tests.unit.gateway_forward_fixtures import (
    CHAT,
    Gateway,
    MakeGateway,
    closed_port_endpoint,
    make_gateway_fixture,  # noqa: F401 (the fixture make_gateway)
    two_fixture,  # noqa: F401 (the fixture two)
)


async def test_refused_connection_is_retried_on_another_replica(make_gateway: MakeGateway,
                                                                two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", closed_port_endpoint())
    await put_instance(r.store, "m:1", two[1].endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):  # round-robin makes the dead replica come first at least once
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert await resp.read() == completion_bytes("b", "m")
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "connect"}) >= 1


@contextlib.asynccontextmanager
async def raw_engine(behave: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[str]:
    """An engine that misbehaves at the socket level, as `behave` does with each connection: its endpoint."""
    server = await asyncio.start_server(behave, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def assert_replayed_on_b(r: Gateway, bad: str, b: FakeEngine, reason: str) -> None:
    """Replicas `m` (at `bad`) and `m:1` (engine b): every request ends as b's answer, some after a retry."""
    await put_instance(r.store, "m", bad)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):  # round-robin makes the bad replica come first at least once
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert await resp.read() == completion_bytes("b", "m")
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": reason}) >= 1


async def test_engine_dying_before_it_answers_is_retried(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    """An engine that takes the request and dies (connection closed, no response): replayed on another."""
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.close()

    async with raw_engine(die) as dying:
        await assert_replayed_on_b(await make_gateway(), dying, two[1], "disconnect")


async def test_body_breaking_off_before_anything_was_relayed_is_retried(make_gateway: MakeGateway,
                                                                        two: list[FakeEngine]) -> None:
    """Headers promise 1000 bytes, 10 come, the connection closes: a small body is relayed whole, so the
    client has seen nothing yet and another replica answers instead; with no other replica, a clean 502."""
    async def break_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"partial"')
        await writer.drain()
        writer.close()

    async with raw_engine(break_off) as broken:
        r = await make_gateway()
        await put_instance(r.store, "m", broken)
        await until(lambda: r.ready_count() == 1)
        async with r.post(CHAT) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_error"
        await assert_replayed_on_b(r, broken, two[1], "broken")


async def test_stream_dying_before_its_first_token_is_retried(make_gateway: MakeGateway,
                                                             two: list[FakeEngine]) -> None:
    """An engine sends a streamed answer's head at once and its first token after prefill; one that dies in
    between has given the client nothing, so another replica answers the whole stream."""
    async def head_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_engine(head_then_die) as dying:
        r = await make_gateway()
        await put_instance(r.store, "m", dying)
        await put_instance(r.store, "m:1", two[1].endpoint)
        await until(lambda: r.ready_count() == 2)
        stream = json.dumps({**json.loads(CHAT), "stream": True}).encode()  # no prefix: picks take turns
        for _ in range(4):  # round-robin makes the dying replica come first at least once
            async with r.post(stream) as resp:
                assert resp.status == 200 and resp.headers["X-Engine"] == "b"
                assert await resp.read() == b"".join(sse_chunks("b", "m"))
        assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "broken"}) >= 1


async def test_engine_503_before_any_byte_is_retried(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
    a, b = two
    a.status = 503
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["X-Engine"] == "b"
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "503"}) >= 1


async def test_last_replica_503_is_passed_through(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
    two[0].status = 503
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "busy"


async def test_all_replicas_unreachable_gives_503(make_gateway: MakeGateway) -> None:
    r = await make_gateway(max_attempts=2)
    await put_instance(r.store, "m", closed_port_endpoint())
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        err = (await resp.json())["error"]
        assert err["type"] == "server_error" and "could be reached" in err["message"]


async def test_no_ready_replica_gives_503_with_retry_after(make_gateway: MakeGateway,
                                                           two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    await until(lambda: r.table.knows("m"))
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "model_not_ready"
    assert two[0].received == []
    assert r.metric("nebula_gateway_no_replica_total", {"model": "m"}) == 1


async def test_request_waits_for_a_replica_becoming_ready(make_gateway: MakeGateway,
                                                          two: list[FakeEngine]) -> None:
    r = await make_gateway(no_replica_wait_s=5.0)
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.sleep(0.1)
    assert not request.done()
    await put_instance(r.store, "m", two[0].endpoint, Phase.READY)
    resp = await asyncio.wait_for(request, 5.0)
    assert resp.status == 200
    resp.release()
