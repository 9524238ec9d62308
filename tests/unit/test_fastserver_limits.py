"""The data-plane server's connection caps and deadlines (services/http/admission.py) over real loopback
sockets. Deadlines run on the server's sweep, which the tests call with a time ahead of the clock instead of
waiting: `sweep(now + 11)` is eleven seconds later as far as the server can tell."""

from __future__ import annotations

import asyncio
import time

import pytest

from nebula.services.http.admission import RESERVE_LIFETIME_S, ConnectionLimits
from tests.harness.fastserver import BIG, Conn, Served, from_aiohttp, post, serving, until

pytestmark = pytest.mark.timeout(60)

OTHER = b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n"  # served by aiohttp, the reserve path in these tests


async def closed_at_once(conn: Conn) -> bool:
    """The server closed the connection without a word (a refused connection reads nothing, or a reset)."""
    try:
        return await conn.rest() == b""
    except ConnectionResetError:
        return True


async def busy(served: Served, source: str = "") -> Conn:
    """A connection whose request the server is answering (/hold waits for the test)."""
    conn = await served.connect(source=source)
    served.routes.held.clear()
    await conn.send(post("/hold"))
    await until(served.routes.held.is_set)
    return conn


# --- caps -------------------------------------------------------------------------------------------------


async def test_a_connection_over_the_cap_is_closed_at_once_and_counted() -> None:
    async with serving(limits=ConnectionLimits(max_connections=2, reserve=0)) as served:
        first, second = await busy(served), await busy(served)
        refused = await served.connect()
        assert await closed_at_once(refused)
        assert served.events.counts["refused:max_connections"] == 1 and served.server.open == 2
        served.routes.release.set()
        assert [(await c.answer()).body for c in (first, second)] == [b"held", b"held"]


async def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    async with serving(limits=ConnectionLimits(max_connections=3, reserve=0)) as served:
        older, newer = await served.connect(), await served.connect()
        for conn in (older, newer):
            await conn.send(post("/fast", b"x"))
            await conn.answer()
        held = await busy(served)
        new = await served.connect()
        await new.send(post("/fast", b"new"))
        assert (await new.answer()).body == b"new"
        assert await closed_at_once(older)  # idle longest: closed to make room
        await newer.send(post("/fast", b"still here"))
        assert (await newer.answer()).body == b"still here"
        assert served.events.counts["reaped"] == 1 and not served.events.counts["refused:max_connections"]
        served.routes.release.set()
        assert (await held.answer()).body == b"held"


async def test_a_client_over_its_own_cap_is_refused_and_others_are_not() -> None:
    async with serving(limits=ConnectionLimits(max_per_ip=2)) as served:
        mine = [await served.connect(source="127.0.0.1") for _ in range(2)]
        assert await closed_at_once(await served.connect(source="127.0.0.1"))
        assert served.events.counts["refused:per_ip"] == 1
        other = await served.connect(source="127.0.0.2")
        for conn in (*mine, other):
            await conn.send(post("/fast", b"ok"))
            assert (await conn.answer()).body == b"ok"
        # A connection that ends gives its place back.
        mine[0].writer.close()
        await until(lambda: served.server.open == 2)
        again = await served.connect(source="127.0.0.1")
        await again.send(post("/fast", b"back"))
        assert (await again.answer()).body == b"back"


async def test_connections_aiohttp_serves_still_count() -> None:
    async with serving(limits=ConnectionLimits(max_connections=1, reserve=0)) as served:
        handed = await served.connect()
        await handed.send(OTHER)
        assert (await handed.answer()).body == b"aiohttp"  # kept alive, by aiohttp now
        assert await closed_at_once(await served.connect())
        handed.writer.close()
        await until(lambda: served.server.open == 0)
        conn = await served.connect()
        await conn.send(post("/fast", b"in"))
        assert (await conn.answer()).body == b"in"


async def test_over_the_cap_the_reserve_serves_only_the_operators_paths() -> None:
    limits = ConnectionLimits(max_connections=1, reserve=2)
    async with serving(limits=limits, reserve_paths=frozenset({"/other"})) as served:
        await busy(served)
        probe = await served.connect()
        await probe.send(OTHER)
        a = await probe.answer()
        assert (a.status, a.body) == (200, b"aiohttp") and from_aiohttp(a)
        # Anything else on a reserve connection is told why, in the OpenAI shape, and the connection ends.
        other = await served.connect()
        await other.send(post("/fast", b"x"))
        a = await other.answer()
        assert (a.status, a.error()["code"], a.headers["Connection"], a.headers["Retry-After"]) == (
            503, "too_many_connections", "close", "1")
        assert served.events.counts["refused:reserve_path"] == 1
        # Beyond the reserve: closed at once.
        third = await served.connect()
        assert await closed_at_once(third) or await closed_at_once(await served.connect())
        # A reserve connection aiohttp keeps alive ends at its expiry.
        assert served.server.sweep(time.monotonic() + RESERVE_LIFETIME_S + 1) >= 1
        assert await closed_at_once(probe)


# --- deadlines --------------------------------------------------------------------------------------------


async def test_a_head_that_trickles_in_is_cut_at_the_header_deadline() -> None:
    async with serving(limits=ConnectionLimits(header_timeout_s=10)) as served:
        conn = await served.connect()
        start = time.monotonic()
        for byte in b"POST /fast HTTP/1.1\r\nHo":
            await conn.send(bytes([byte]))  # each byte is progress, but not a head
        await until(lambda: any(c._buf for c in served.server.connections))
        assert served.server.sweep(start + 9) == 0
        assert served.server.sweep(start + 11) == 1
        a = await conn.answer()
        assert (a.status, a.error()["code"], a.headers["Connection"]) == (408, "request_timeout", "close")
        assert "gateway.header_timeout_s" in a.error()["message"]
        assert served.events.counts["cut:header"] == 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline() -> None:
    async with serving(limits=ConnectionLimits(header_timeout_s=10)) as served:
        conn = await served.connect()
        await until(lambda: served.site.connections == 1)
        served.server.sweep(time.monotonic() + 11)
        assert await closed_at_once(conn)


async def test_a_later_requests_head_is_due_from_its_first_byte() -> None:
    async with serving(limits=ConnectionLimits(header_timeout_s=10)) as served:
        conn = await served.connect()
        await conn.send(post("/fast", b"x"))
        await conn.answer()
        # Idle between requests: keepalive_s applies, not the header deadline.
        assert served.server.sweep(time.monotonic() + 11) == 0
        start = time.monotonic()
        await conn.send(b"POST /fast HTTP/1.1\r\n")
        await until(lambda: any(c._buf for c in served.server.connections))
        assert served.server.sweep(start + 9) == 0
        assert served.server.sweep(time.monotonic() + 11) == 1
        assert (await conn.answer()).status == 408


async def test_a_body_that_trickles_in_is_cut_at_the_body_deadline_and_released() -> None:
    async with serving(admit=True, limits=ConnectionLimits(body_timeout_s=10)) as served:
        conn = await served.connect()
        start = time.monotonic()
        await conn.send(post("/fast", b"", "Content-Length: 100", "Authorization: Bearer ok") + b"0123456789")
        await until(lambda: served.routes.admitted == ["/fast"])
        for byte in b"abcdef":
            await conn.send(bytes([byte]))  # a byte now and then used to reset the idle timer
        assert served.server.sweep(start + 9) == 0
        assert served.server.sweep(time.monotonic() + 11) == 1
        a = await conn.answer()
        assert (a.status, a.error()["code"], a.headers["Connection"]) == (408, "request_timeout", "close")
        assert "gateway.body_timeout_s" in a.error()["message"]
        assert served.routes.released == ["/fast"] and served.routes.calls == []
        assert served.events.counts["cut:body"] == 1


async def test_a_client_that_stops_reading_is_cut_at_the_write_deadline() -> None:
    async with serving(admit=True, limits=ConnectionLimits(write_timeout_s=10)) as served:
        routes = served.routes
        conn = await served.connect(rcvbuf=64 * 1024)
        await conn.send(post("/big", b"", "Authorization: Bearer ok"))
        await until(lambda: routes.big_written > 0)
        (server_side,) = served.server.connections
        await until(lambda: server_side.blocked_since is not None)
        assert served.server.sweep(time.monotonic() + 5) == 0  # blocked, not for long yet
        assert served.server.sweep(time.monotonic() + 11) == 1
        await until(lambda: routes.released == ["/big"])  # the route was cancelled: what it held is back
        assert not routes.big_done.is_set() and routes.big_written < len(BIG)
        await until(lambda: served.server.open == 0)
        assert served.events.counts["cut:write"] == 1


async def test_a_request_past_its_deadline_is_answered_504_and_released() -> None:
    async with serving(admit=True, limits=ConnectionLimits(request_timeout_s=30)) as served:
        conn = await served.connect()
        await conn.send(post("/hold", b"", "Authorization: Bearer ok"))
        await until(served.routes.held.is_set)
        assert served.server.sweep(time.monotonic() + 29) == 0
        assert served.server.sweep(time.monotonic() + 31) == 1
        a = await conn.answer()
        assert (a.status, a.error()["code"], a.headers["Connection"]) == (504, "request_timeout", "close")
        await until(served.routes.cancelled.is_set)
        assert served.routes.released == ["/hold"] and served.events.counts["cut:request"] == 1
        assert await conn.rest() == b""


async def test_a_streamed_answer_past_its_deadline_is_cut_short() -> None:
    async with serving(limits=ConnectionLimits(request_timeout_s=30, write_timeout_s=600)) as served:
        conn = await served.connect(rcvbuf=64 * 1024)
        await conn.send(post("/big"))
        await until(lambda: served.routes.big_written > 0)
        served.server.sweep(time.monotonic() + 31)
        try:
            received = await conn.rest()
        except ConnectionResetError:
            received = b""
        assert not received.endswith(b"0\r\n\r\n")  # never the last chunk: no client takes it for whole


# --- a request's release ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["answered", "route-failed", "client-left", "shutdown"])
async def test_release_is_called_once_however_the_request_ends(ending: str) -> None:
    async with serving(admit=True, shutdown_timeout_s=0.1) as served:
        conn = await served.connect()
        path = {"answered": "/fast", "route-failed": "/fail"}.get(ending, "/hold")
        await conn.send(post(path, b"x", "Authorization: Bearer ok"))
        if ending == "client-left":
            await until(served.routes.held.is_set)
            conn.writer.close()
        elif ending == "shutdown":
            await until(served.routes.held.is_set)
            await served.runner.cleanup()
        else:
            await conn.answer()
        await until(lambda: served.routes.released == [path])
        await asyncio.sleep(0.01)
        assert served.routes.released == [path]
