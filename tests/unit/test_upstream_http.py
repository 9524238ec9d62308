"""The engine hop's HTTP/1.1 client against real sockets: a scripted raw server (to send exactly the bytes
a case needs, or close at the worst moment) and a real aiohttp server (keep-alive as engines do it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nebula.adapters.upstream_http import (
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamUnreachable,
    _Connection,
)
from nebula.adapters.upstream_response import READ_HIGH

pytestmark = pytest.mark.timeout(60)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawServer:
    endpoint: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[RawServer]:
    """A server that runs `script` on each connection (after counting it)."""
    state = RawServer("")

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await script(reader, writer)
            if await reader.read() == b"":
                state.closed_by_client.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            state.closed_by_client.set()
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield state


def answering(*responses: bytes, then_close: bool = False) -> Script:
    """Answer one request with each response in turn on the same connection."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        if then_close:
            writer.close()
    return script


async def post(pool: UpstreamPool, endpoint: str, body: bytes = b"{}", timeout_s: float = 10.0) -> bytes:
    async with await pool.post(endpoint, "/v1/x", {"Content-Type": "application/json"}, body, timeout_s) as r:
        return await r.read()


async def test_the_request_goes_out_as_sent_and_the_connection_is_reused() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            seen.append(await read_request(reader))
            writer.write(OK)

    pool = UpstreamPool(connect_timeout_s=1.0)
    async with raw_server(script) as srv:
        for _ in range(3):
            assert await post(pool, srv.endpoint, b'{"a": 1}') == b"ok"
        assert srv.connections == 1
        assert pool.idle_count(srv.endpoint) == 1
    host = srv.endpoint.removeprefix("http://")
    assert seen[0] == (f"POST /v1/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 8\r\n"
                       "Content-Type: application/json\r\n\r\n{\"a\": 1}").encode()
    pool.close()


async def test_a_connection_the_engine_closed_while_idle_is_replaced_unseen() -> None:
    pool = UpstreamPool(connect_timeout_s=1.0)
    async with raw_server(answering(OK, then_close=True)) as srv:
        assert await post(pool, srv.endpoint) == b"ok"
        await asyncio.wait_for(srv.closed_by_client.wait(), 5)  # the server's side is closed now
        assert await post(pool, srv.endpoint) == b"ok"
        assert srv.connections == 2
    pool.close()


async def test_a_refused_connection_is_unreachable() -> None:
    async with raw_server(answering(OK)) as srv:
        endpoint = srv.endpoint
    with pytest.raises(UpstreamUnreachable, match="cannot connect"):
        await post(UpstreamPool(connect_timeout_s=1.0), endpoint)


async def test_a_fresh_connection_closed_before_the_answer_is_disconnected_and_not_retried() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async with raw_server(hang_up) as srv:
        with pytest.raises(UpstreamDisconnected):
            await post(UpstreamPool(connect_timeout_s=1.0), srv.endpoint)
        assert srv.connections == 1


async def test_no_answer_in_time_is_a_timeout_and_the_connection_closes() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    pool = UpstreamPool(connect_timeout_s=1.0)
    async with raw_server(silent) as srv:
        with pytest.raises(TimeoutError):
            await post(pool, srv.endpoint, timeout_s=0.2)
        await asyncio.wait_for(srv.closed_by_client.wait(), 5)
        assert pool.idle_count(srv.endpoint) == 0


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
], ids=["content-length", "chunked"])
async def test_a_body_cut_short_is_an_error_not_an_end(response: bytes) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        writer.transport.abort()

    async with raw_server(cut) as srv:
        resp = await UpstreamPool(connect_timeout_s=1.0).post(srv.endpoint, "/", {}, b"", 10.0)
        async with resp:
            with pytest.raises(UpstreamDisconnected):
                while await resp.read_chunk():
                    pass


async def test_garbage_is_disconnected() -> None:
    async with raw_server(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as srv:
        with pytest.raises(UpstreamDisconnected, match="invalid response"):
            await post(UpstreamPool(connect_timeout_s=1.0), srv.endpoint)


async def test_releasing_an_unfinished_answer_closes_the_connection() -> None:
    """How an engine learns that its client went away: the connection closes mid-stream."""
    async def stream_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"6\r\ndata: \r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    pool = UpstreamPool(connect_timeout_s=1.0)
    async with raw_server(stream_forever) as srv:
        async with await pool.post(srv.endpoint, "/", {}, b"", 10.0) as resp:
            assert await resp.read_chunk()
        await asyncio.wait_for(srv.closed_by_client.wait(), 5)
        assert pool.idle_count(srv.endpoint) == 0


def test_line_breaks_in_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        asyncio.run(UpstreamPool(1.0).post("http://127.0.0.1:9", "/", {"X": "a\r\nInjected: 1"}, b"", 1.0))


def test_endpoints_must_be_plain_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        asyncio.run(UpstreamPool(1.0).post("unix:///run/x.sock", "/", {}, b"", 1.0))


async def test_a_large_streamed_body_arrives_whole_through_a_slow_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past READ_HIGH unread bytes the client stops reading the socket, and resumes as the reader catches up."""
    pauses: list[bool] = []
    pause, resume = _Connection.pause_reading, _Connection.resume_reading

    def counted_pause(conn: _Connection) -> None:
        pauses.append(True)
        pause(conn)

    def counted_resume(conn: _Connection) -> None:
        pauses.append(False)
        resume(conn)

    monkeypatch.setattr(_Connection, "pause_reading", counted_pause)
    monkeypatch.setattr(_Connection, "resume_reading", counted_resume)
    piece = bytes(range(256)) * 256  # 64 KiB
    count = 4 * READ_HIGH // len(piece)

    async def big(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(count):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/big", big)
    async with TestServer(app) as server:
        pool = UpstreamPool(connect_timeout_s=1.0)
        endpoint = str(server.make_url("")).rstrip("/")
        for _ in range(2):  # twice: the connection comes back to the pool in a readable state
            received = bytearray()
            async with await pool.post(endpoint, "/big", {}, b"x", 30.0) as resp:
                assert resp.status == 200 and resp.content_length is None
                while chunk := await resp.read_chunk():
                    received += chunk
                    await asyncio.sleep(0.001)
            assert bytes(received) == piece * count
        assert pool.idle_count(endpoint) == 1
        assert True in pauses and pauses.count(True) == pauses.count(False)
        pool.close()
        assert pool.idle_count(endpoint) == 0
