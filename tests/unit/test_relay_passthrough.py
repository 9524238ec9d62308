"""The streaming relay on real loopback sockets: an engine written byte by byte (asyncio server), the gateway's
engine client (upstream_http) and the data-plane server (fastserver) with a route that relays, and raw clients.

An HTTP/1.1 client gets the engine's chunked framing as the engine wrote it (its chunk extensions prove that
nothing re-framed it), an HTTP/1.0 client the body without framing, and a read that breaks the framing is
never forwarded: the client's connection is cut, so its answer can never look whole."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from nebula.adapters.upstream_http import UpstreamPool
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.fastrequest import FastRequest, Route
from nebula.services.http.relay import RelayStats, relay
from nebula.services.http.site import FastSite
from tests.harness.fastserver import post
from tests.unit.test_upstream_http import read_request

pytestmark = pytest.mark.timeout(30)

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(6)] + [b"data: [DONE]\n\n"]
# Three bursts, as an engine's token stream comes: each a few chunks, with extensions no re-framing would keep.
FRAMES = [b"%x;n=%d\r\n%s\r\n" % (len(e), i, e) for i, e in enumerate(EVENTS)]
BURSTS = [b"".join(FRAMES[:2]), b"".join(FRAMES[2:5]), b"".join(FRAMES[5:]) + b"0\r\n\r\n"]


async def engine_writing(bursts: list[bytes], head: bytes = HEAD) -> tuple[asyncio.Server, str]:
    """An engine that answers each request with `head`, then each burst in its own write (after a pause, so
    each is a read of its own at the gateway)."""
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await read_request(reader)
            writer.write(head)
            for burst in bursts:
                await asyncio.sleep(0.05)
                writer.write(burst)
                await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def gateway_to(endpoint: str, stats: list[RelayStats]) -> AsyncIterator[int]:
    """A data-plane server whose one route relays POST /stream from `endpoint`; yields its port."""
    pool = UpstreamPool(connect_timeout_s=2.0)

    async def stream(request: FastRequest, reply: ConnectionReply) -> None:
        st = RelayStats()
        stats.append(st)
        async with await pool.post(endpoint, "/v1/chat/completions", {}, request.body, 10.0) as upstream:
            await relay(reply, upstream, st)

    def router(method: str, path: str) -> Route | None:
        return stream if (method, path) == ("POST", "/stream") else None

    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = FastSite(runner, router, "127.0.0.1", 0, max_body=1 << 20)
    await site.start()
    try:
        yield site.port
    finally:
        pool.close()
        await runner.cleanup()


async def exchange(port: int, request: bytes) -> bytes:
    """Everything the gateway sends for `request` on a new connection, up to its close or a chunked end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    got = b""
    try:
        async with asyncio.timeout(10):
            while not got.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(65536)
                if not data:
                    break
                got += data
    except ConnectionResetError:
        pass  # an abort: what arrived before it is the answer
    writer.close()
    return got


async def test_an_http11_client_gets_the_engines_framing_as_it_came() -> None:
    server, endpoint = await engine_writing(BURSTS)
    stats: list[RelayStats] = []
    async with server, gateway_to(endpoint, stats) as port:
        got = await exchange(port, post("/stream", b"{}"))
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert body == b"".join(BURSTS)  # extensions and all: forwarded, not re-framed
    assert stats[0].complete and stats[0].events == len(EVENTS)
    assert stats[0].first_chunk_at < stats[0].last_chunk_at


async def test_an_http10_client_gets_the_body_without_framing() -> None:
    server, endpoint = await engine_writing(BURSTS)
    async with server, gateway_to(endpoint, []) as port:
        got = await exchange(port, post("/stream", b"{}", version="HTTP/1.0"))
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"".join(EVENTS)


async def test_a_body_that_ended_with_its_head_is_framed_by_the_gateway() -> None:
    # Head and whole body in one read: the body ended before the relay could switch to passthrough.
    server, endpoint = await engine_writing([], head=HEAD + b"".join(BURSTS))
    async with server, gateway_to(endpoint, []) as port:
        got = await exchange(port, post("/stream", b"{}"))
    body = got.partition(b"\r\n\r\n")[2]
    assert body == b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"".join(EVENTS)), b"".join(EVENTS))


async def test_a_read_that_breaks_the_framing_is_not_forwarded_and_the_answer_is_cut() -> None:
    broken = [BURSTS[0], FRAMES[2] + b"zz\r\nnot a chunk\r\n"]
    server, endpoint = await engine_writing(broken)
    stats: list[RelayStats] = []
    async with server, gateway_to(endpoint, stats) as port:
        got = await exchange(port, post("/stream", b"{}"))
    assert got.partition(b"\r\n\r\n")[2] == BURSTS[0]  # the good read only, and no end: the client sees a cut
    assert not stats[0].complete


def deframed(body: bytes) -> bytes:
    """The payload of a chunked body (without extensions or trailers)."""
    out: list[bytes] = []
    at = 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].partition(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2


async def test_a_client_that_reads_slowly_holds_the_engine_back_and_gets_every_byte() -> None:
    # 64 MiB of events, more than the sockets between engine and client hold (the kernel here lets one
    # socket's receive buffer grow to 32 MiB; the client's is held at 64 KiB): while the client does not read,
    # the gateway stops reading the engine (whose writes then wait) instead of buffering the stream.
    event = b"data: " + b"x" * 8186 + b"\n\n"
    frame = b"%x\r\n%s\r\n" % (len(event), event)
    count = 8192
    engine_done: list[float] = []
    served = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # keep-alive: one answer per request, so the pool can reuse the connection
                await read_request(reader)
                served += 1
                writer.write(HEAD)
                for _ in range(count):
                    writer.write(frame)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                engine_done.append(asyncio.get_running_loop().time())
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stats: list[RelayStats] = []
    async with server, gateway_to(endpoint, stats) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect: no autotuning
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)  # which stops reading at 128 KiB unread
        for _ in range(2):  # the second answer comes over the engine connection the first one paused
            writer.write(post("/stream", b"{}"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            await asyncio.sleep(0.5)
            started_reading = asyncio.get_running_loop().time()
            pieces = [await reader.read(1 << 20)]
            while not pieces[-1].endswith(b"\r\n0\r\n\r\n"):
                pieces.append(await reader.read(1 << 20))
            body = b"".join(pieces)
            # (What the gateway had read when it switched to passthrough it frames itself: compare payloads.)
            assert deframed(body) == event * count
            assert engine_done and engine_done[-1] > started_reading, "the engine was not held back"
        writer.close()
    assert served == 2 and all(st.complete and st.events == count for st in stats)
