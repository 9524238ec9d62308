"""A data-plane HTTP/1.1 connection's life over real loopback sockets: handed over to aiohttp, left by its
client, closed when idle, and at shutdown (the server, its routes and the raw client: tests/harness/fastserver.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness.fastserver import KEEPALIVE_S, Served, from_aiohttp, post, serving, until
from tests.unit.fastserver_fixtures import served_fixture  # noqa: F401 (the fixture served)

pytestmark = pytest.mark.timeout(60)


# --- handover to aiohttp -----------------------------------------------------------------------------------


async def test_aiohttp_takes_over_a_connection_for_a_path_the_router_does_not_know(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"a"))
    a = await conn.answer()
    assert (a.body, from_aiohttp(a)) == (b"a", False)
    await conn.send(b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n")
    a = await conn.answer()
    assert (a.status, a.body, from_aiohttp(a)) == (200, b"aiohttp", True)
    # The connection is aiohttp's now, for good: even a path the fast server knows is aiohttp's.
    await conn.send(post("/fast", b"b"))
    a = await conn.answer()
    assert (a.status, a.body) == (200, b"served by aiohttp: b")
    assert served.routes.calls == ["/fast"]
    assert served.site.connections == 0


async def test_a_pipelined_handover_keeps_the_bytes_behind_it(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"a") + b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n" + post("/fast", b"b"))
    assert [(await conn.answer()).body for _ in range(3)] == [b"a", b"aiohttp", b"served by aiohttp: b"]


async def test_an_unknown_path_is_answered_by_aiohttp(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/nowhere"))
    a = await conn.answer()
    assert a.status == 404 and from_aiohttp(a)


HANDED_OVER = [
    ("chunked", post("/fast", b"5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), b"served by aiohttp: hello"),
    ("absolute-form", post("/fast", b"abs").replace(b"POST /fast", b"POST http://gw/fast"),
     b"served by aiohttp: abs"),
]


@pytest.mark.parametrize(("request_bytes", "body"), [r[1:] for r in HANDED_OVER], ids=[r[0] for r in HANDED_OVER])
async def test_requests_only_aiohttp_reads_are_handed_over(served: Served, request_bytes: bytes, body: bytes) -> None:
    conn = await served.connect()
    await conn.send(request_bytes)
    a = await conn.answer()
    assert (a.status, a.body) == (200, body)
    assert served.routes.calls == []


async def test_an_unusual_expectation_is_aiohttps(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"x", "Expect: something-else"))
    a = await conn.answer()
    assert a.status == 417 and from_aiohttp(a)  # aiohttp's answer to an expectation it cannot meet


# --- a client that leaves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_a_client_that_leaves_cancels_its_route(served: Served, how: str) -> None:
    # A half-close counts as leaving, as in aiohttp: it is how a departing client's FIN first shows.
    conn = await served.connect()
    await conn.send(post("/hold"))
    await until(served.routes.held.is_set)
    if how == "close":
        conn.writer.close()
    else:
        conn.writer.write_eof()
    await until(served.routes.cancelled.is_set)
    await until(lambda: served.site.connections == 0)


# --- idle connections -----------------------------------------------------------------------------------------


async def test_the_sweep_closes_only_idle_connections(served: Served) -> None:
    answered = await served.connect()
    await answered.send(post("/fast", b"x"))
    await answered.answer()
    silent = await served.connect()  # never sends a byte
    busy = await served.connect()
    await busy.send(post("/hold"))
    await until(served.routes.held.is_set)
    await until(lambda: served.site.connections == 3)

    assert served.server.sweep(time.monotonic()) == 0  # none idle for keepalive_s yet
    # (The silent one's first head was due long before: a connection that sends nothing is cut at the
    # header deadline, earlier than keepalive_s; test_fastserver_limits.py has the deadlines.)
    assert served.server.sweep(time.monotonic() + KEEPALIVE_S + 1) == 2
    for conn in (answered, silent):
        assert await conn.rest() == b""
    # The busy one is answered, and kept: it is idle only from its answer on.
    served.routes.release.set()
    assert (await busy.answer()).body == b"held"
    await busy.send(post("/fast", b"still open"))
    assert (await busy.answer()).body == b"still open"


async def test_the_site_closes_idle_connections_by_itself() -> None:
    # FastSite runs the sweep (every max(0.5 s, keepalive_s / 4)): half a second here.
    async with serving(keepalive_s=0.1) as served:
        conn = await served.connect()
        await conn.send(post("/fast", b"x"))
        await conn.answer()
        assert await conn.rest() == b""


# --- shutdown -------------------------------------------------------------------------------------------------


async def test_shutdown_waits_for_busy_connections_and_closes_idle_ones(served: Served) -> None:
    idle = await served.connect()
    await idle.send(post("/fast", b"x"))
    await idle.answer()
    handed = await served.connect()  # aiohttp's: its own shutdown closes it
    await handed.send(b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n")
    await handed.answer()
    busy = await served.connect()
    await busy.send(post("/hold"))
    await until(served.routes.held.is_set)
    port = served.site.port

    cleanup = asyncio.create_task(served.runner.cleanup())
    assert await idle.rest() == b""  # at once, while the busy one still holds the shutdown
    assert not cleanup.done()
    with pytest.raises(OSError):  # no longer listening
        await asyncio.open_connection("127.0.0.1", port)
    served.routes.release.set()
    a = await busy.answer()
    # The answer says it is the last one, so the client does not send another into the close.
    assert (a.body, a.headers["Connection"]) == (b"held", "close")
    assert await busy.rest() == b""
    async with asyncio.timeout(5):
        await cleanup
    assert await handed.rest() == b""
    assert not served.routes.cancelled.is_set()


@pytest.mark.parametrize("stopped_by", ["cleanup", "cancelled-service"])
async def test_shutdown_breaks_off_what_is_still_busy_at_the_timeout(stopped_by: str) -> None:
    async with serving(shutdown_timeout_s=0.1) as served:
        busy = await served.connect()
        await busy.send(post("/hold"))
        await until(served.routes.held.is_set)

        async def service() -> None:
            # As runtime.serve_app: SIGTERM cancels the service's task, whose `finally` stops the server (a task
            # with a cancellation pending, where Python 3.11.2's asyncio.timeout cannot time out).
            try:
                await asyncio.Event().wait()
            finally:
                await served.runner.cleanup()

        async with asyncio.timeout(5):
            if stopped_by == "cleanup":
                await served.runner.cleanup()
            else:
                stopping = asyncio.create_task(service())
                await asyncio.sleep(0)
                stopping.cancel()
                await asyncio.wait([stopping])
                assert stopping.cancelled()
        try:
            assert await busy.rest() == b""
        except ConnectionResetError:
            pass  # aborted: a reset is as good as an end here
        await until(served.routes.cancelled.is_set)
