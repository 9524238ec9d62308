"""The data-plane HTTP/1.1 server over real loopback sockets with pipelined and split requests: answers in
order, reading paused for a client far ahead (and for one that does not read), a head split anywhere
(the server, its routes and the raw client: tests/harness/fastserver.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from nebula.services.http.fastconnection import FastConnection
from tests.harness.fastserver import BIG, MAX_BODY, Served, post, serving, until
from tests.unit.fastserver_fixtures import served_fixture  # noqa: F401 (the fixture served)

pytestmark = pytest.mark.timeout(60)


# --- pipelining and split requests -------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/hold") + post("/fast", b"second"))
    await until(served.routes.held.is_set)
    # The second request is in the server's buffer, but waits for the first answer.
    assert served.routes.calls == ["/hold"]
    served.routes.release.set()
    assert (await conn.answer()).body == b"held"
    assert (await conn.answer()).body == b"second"


async def test_a_client_far_ahead_is_paused_then_served(served: Served) -> None:
    # Over 256 KiB pipelined behind a request in progress: the server stops reading (its buffer would grow
    # without bound otherwise), then reads on as it answers; every answer comes, in order.
    conn = await served.connect()
    bodies = [b"%04d" % i + b"x" * 996 for i in range(300)]
    conn.writer.write(post("/hold") + b"".join(post("/fast", b) for b in bodies))
    await until(served.routes.held.is_set)
    (fast_conn,) = served.server.connections
    transport = fast_conn._transport  # private: the pause is not observable from outside
    assert transport is not None
    await until(lambda: not transport.is_reading())
    served.routes.release.set()
    assert (await conn.answer()).body == b"held"
    assert [(await conn.answer()).body for _ in bodies] == bodies
    await conn.writer.drain()
    assert transport.is_reading()


@pytest.mark.parametrize("key", ["Bearer ok", "Bearer bad"], ids=["answered", "refused-by-admit"])
async def test_a_client_far_ahead_that_does_not_read_is_held_to_a_bounded_buffer(key: str) -> None:
    # Pipelined requests with a client that does not read its answers: once the server's writes wait on the
    # client, it must stop reading too, holding bounded buffers (not all the client sends, nor all the
    # answers to it). Refusals by admit are answered without a task: they must be held back all the same.
    async with serving(admit=True) as served:
        await _flood(served, post("/fast", b"b" * MAX_BODY if key == "Bearer ok" else b"", f"Authorization: {key}"))


async def _flood(served: Served, request: bytes) -> None:
    conn = await served.connect(rcvbuf=64 * 1024)
    batch = request * 64

    async def flood() -> None:  # until the server stops taking requests (then drain waits for good)
        while True:
            conn.writer.write(batch)
            await conn.writer.drain()

    flooding = asyncio.create_task(flood())
    try:
        await until(lambda: len(served.server.connections) == 1)
        (fast_conn,) = served.server.connections
        transport = fast_conn._transport  # private: what is held back is not observable from outside
        assert transport is not None
        await until(lambda: fast_conn._drain is not None and not transport.is_reading())
        assert len(fast_conn._buf) <= 2 * 256 * 1024  # what it read ahead, plus at most one read
        assert transport.get_write_buffer_size() <= 256 * 1024  # the high-water mark, plus an answer or so
    finally:
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
        conn.writer.transport.abort()  # a close would wait to send what the server no longer reads


async def test_a_big_body_behind_a_request_in_progress() -> None:
    # Reading paused behind /hold with the next request's body only partly read: once /hold is answered,
    # reading must resume for that body to complete (the buffer is still over the read-ahead limit).
    async with serving(max_body=1024 * 1024) as served:
        conn = await served.connect()
        body = random.Random(1).randbytes(900 * 1024)  # more than the read-ahead limit and one read together
        conn.writer.write(post("/hold") + post("/fast", body))
        await until(served.routes.held.is_set)
        (fast_conn,) = served.server.connections
        transport = fast_conn._transport
        assert transport is not None
        await until(lambda: not transport.is_reading())
        served.routes.release.set()
        assert (await conn.answer()).body == b"held"
        assert (await conn.answer()).body == body


async def test_a_request_split_byte_by_byte(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = 0
    data_received = FastConnection.data_received

    def counting(self: FastConnection, data: bytes) -> None:
        nonlocal reads
        reads += 1
        data_received(self, data)

    monkeypatch.setattr(FastConnection, "data_received", counting)
    conn = await served.connect()
    request = post("/fast", b"hello world")
    for i in range(len(request)):
        # One byte at a time, each read by the server before the next is sent: every split point is seen.
        await conn.send(request[i:i + 1])
        await until(lambda: reads == i + 1)  # noqa: B023 (awaited before i changes)
    a = await conn.answer()
    assert (a.status, a.body) == (200, b"hello world")
    assert served.routes.calls == ["/fast"]


async def test_a_pipelined_request_split_across_writes(served: Served) -> None:
    conn = await served.connect()
    data = post("/fast", b"first") + post("/fast", b"second")
    for cut in (10, 40, len(data) - 3):  # inside a head, near the first body, inside the second body
        await conn.send(data[:cut])
        data = data[cut:]
    await conn.send(data)
    assert [(await conn.answer()).body for _ in range(2)] == [b"first", b"second"]


# --- flow control ---------------------------------------------------------------------------------------------


async def test_a_client_that_does_not_read_holds_the_route_back(served: Served) -> None:
    routes = served.routes
    conn = await served.connect(rcvbuf=64 * 1024)
    await conn.send(post("/big"))
    # /big yields to the loop only when a write waits for the client: once it has yielded with bytes
    # written and not finished, it is blocked on the client.
    await until(lambda: routes.big_written > 0)
    blocked_at = routes.big_written
    await asyncio.sleep(0.05)  # not waiting for a condition: showing one does not change for a while
    assert routes.big_written == blocked_at < len(BIG) and not routes.big_done.is_set()
    a = await conn.answer()
    assert a.status == 200 and a.body == BIG
    await until(routes.big_done.is_set)
