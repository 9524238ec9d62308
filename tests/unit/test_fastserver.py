"""The data-plane HTTP/1.1 server against real loopback sockets: raw clients (to send and check exact bytes:
framing, pipelining, a head split anywhere, a client that stops reading or leaves) and aiohttp's client where
a real client's view is the point (the server, its routes and the raw client: tests/harness/fastserver.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from nebula.services.http.fastconnection import FastConnection
from tests.harness.fastserver import (
    BIG,
    CONTINUE,
    KEEPALIVE_S,
    MAX_BODY,
    Served,
    from_aiohttp,
    post,
    serving,
    until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as s:
        yield s


# --- keep-alive and the shape of an answer ---------------------------------------------------------------


async def test_two_requests_on_one_connection(served: Served) -> None:
    conn = await served.connect()
    for body in (b"first", b"second"):
        await conn.send(post("/fast", body))
        a = await conn.answer()
        assert (a.status, a.body) == (200, body)
        assert a.headers["Content-Length"] == str(len(body))
        assert a.headers["Content-Type"] == "application/octet-stream"
        assert "Connection" not in a.headers and not from_aiohttp(a)
        assert abs(parsedate_to_datetime(a.headers["Date"]).timestamp() - time.time()) < 5
    assert served.routes.calls == ["/fast", "/fast"]
    assert served.site.connections == 1


async def test_extra_headers_are_on_every_answer(served: Served) -> None:
    conn = await served.connect()
    ids = []
    for path in ("/fast", "/stream", "/fail", "/apierror"):
        await conn.send(post(path))
        a = await conn.answer()
        ids.append(a.headers.getall("X-Request-ID"))
    assert ids == [["req-1"], ["req-2"], ["req-3"], ["req-4"]]


async def test_aiohttp_client(served: Served) -> None:
    # A real client's parser accepts the answers, and its pool reuses the connection.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(3):
            async with session.post(f"{served.url}/fast", data=b"hi") as resp:
                assert (resp.status, await resp.read()) == (200, b"hi")
        async with session.post(f"{served.url}/stream") as resp:
            assert await resp.read() == b"onetwothree"
    assert len(served.routes.calls) == 4


async def test_connection_close_from_the_client(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"x", "Connection: close"))
    a = await conn.answer()
    assert (a.body, a.headers["Connection"]) == (b"x", "close")
    assert await conn.rest() == b""


async def test_an_http10_client_is_answered_once(served: Served) -> None:
    # Even when it asks for keep-alive: the server keeps no HTTP/1.0 connection (documented).
    conn = await served.connect()
    await conn.send(post("/fast", b"x", "Connection: keep-alive", version="HTTP/1.0"))
    a = await conn.answer()
    assert (a.status, a.body, a.headers["Connection"]) == (200, b"x", "close")
    assert await conn.rest() == b""


async def test_empty_lines_before_a_request_are_skipped(served: Served) -> None:
    conn = await served.connect()  # RFC 9112 2.2: a server should ignore CRLFs where a request line is due
    await conn.send(b"\r\n\r\n" + post("/fast", b"a") + b"\r\n" + post("/fast", b"b"))
    assert [(await conn.answer()).body for _ in range(2)] == [b"a", b"b"]


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


# --- Expect: 100-continue ----------------------------------------------------------------------------------


async def test_100_continue_comes_before_the_body_is_sent(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"", "Content-Length: 5", "Expect: 100-Continue"))
    async with asyncio.timeout(5):
        assert await conn.reader.readexactly(len(CONTINUE)) == CONTINUE
    assert served.routes.calls == []
    await conn.send(b"hello")
    a = await conn.answer()
    assert (a.status, a.body) == (200, b"hello")


async def test_no_100_continue_when_the_body_came_with_the_head(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"hello", "Expect: 100-continue"))
    a = await conn.answer()  # the first thing read is the answer itself
    assert (a.status, a.body) == (200, b"hello")


async def test_a_body_over_the_limit_is_refused_without_100_continue(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"", f"Content-Length: {MAX_BODY + 1}", "Expect: 100-continue"))
    a = await conn.answer()
    assert a.status == 413 and a.error()["code"] == "request_too_large"
    assert await conn.rest() == b""


# --- refusals ---------------------------------------------------------------------------------------------


async def test_a_body_over_max_body_is_refused(served: Served) -> None:
    conn = await served.connect()
    # The head alone: the refusal comes before the body is read (sending it would race the close).
    await conn.send(post("/fast", b"", f"Content-Length: {MAX_BODY + 1}"))
    a = await conn.answer()
    assert a.status == 413 and a.headers["Connection"] == "close"
    error = a.error()
    assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")
    assert str(MAX_BODY) in error["message"]
    assert await conn.rest() == b""  # the server ended its side, and waits for the client to end its own
    assert served.routes.calls == []
    conn.writer.close()
    await until(lambda: served.site.connections == 0)


async def test_a_refused_client_that_goes_on_sending_still_gets_the_answer(served: Served) -> None:
    # Closing at once with the body still arriving would make the kernel reset the connection, and the
    # client would get the reset instead of the 413: the server lingers, dropping what arrives, instead.
    conn = await served.connect()
    conn.writer.write(post("/fast", b"", "Content-Length: 4194304"))
    body = asyncio.create_task(conn.send(b"b" * 4194304))
    a = await conn.answer()
    assert (a.status, a.error()["code"]) == (413, "request_too_large")
    assert await conn.rest() == b""
    async with asyncio.timeout(5):
        await body  # all of it was taken (and dropped)
    conn.writer.close()
    await until(lambda: served.site.connections == 0)


async def test_a_body_of_max_body_is_read(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"b" * MAX_BODY))
    assert (await conn.answer()).body == b"b" * MAX_BODY


async def test_a_head_over_64k_is_refused(served: Served) -> None:
    conn = await served.connect()
    # No end of head yet, and one byte over: the server has read all of it when it answers, so its close
    # leaves nothing unread (which would reset the connection under the answer).
    partial = post("/fast")[:-4] + b"\r\nX-Big: "
    await conn.send(partial + b"a" * (64 * 1024 + 1 - len(partial)))
    a = await conn.answer()
    assert a.status == 431 and a.error()["code"] == "request_header_fields_too_large"
    assert await conn.rest() == b""


REFUSED = [
    ("garbage", b"HELLO\r\n\r\n", 400, "bad_request"),
    ("extra-space", b"POST  /fast HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("http2", b"GET / HTTP/2.0\r\n\r\n", 505, "http_version_not_supported"),
    ("bare-lf", b"POST /fast HTTP/1.1\nContent-Length: 0\r\n\r\n", 400, "bad_request"),
    ("space-before-colon", b"POST /fast HTTP/1.1\r\nContent-Length : 0\r\n\r\n", 400, "bad_request"),
    ("cl-and-te", post("/fast", b"", "Content-Length: 0", "Transfer-Encoding: chunked"), 400, "bad_request"),
    ("te-gzip", post("/fast", b"", "Transfer-Encoding: gzip"), 501, "not_implemented"),
    ("too-many-fields", post("/fast", b"", *[f"H{i}: v" for i in range(200)]), 431,
     "request_header_fields_too_large"),
    ("huge-content-length", post("/fast", b"", "Content-Length: " + "9" * 5000), 400, "bad_request"),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_malformed_requests_are_refused(served: Served, request_bytes: bytes, status: int, code: str) -> None:
    conn = await served.connect()
    await conn.send(request_bytes)
    a = await conn.answer()
    assert (a.status, a.error()["code"], a.headers["Connection"]) == (status, code, "close")
    assert await conn.rest() == b""
    assert served.routes.calls == []


async def test_a_malformed_request_after_a_good_one(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fast", b"ok") + b"GET / HTTP/2.0\r\n\r\n")
    assert (await conn.answer()).body == b"ok"
    assert (await conn.answer()).status == 505
    assert await conn.rest() == b""


# --- admission from the head ------------------------------------------------------------------------------


@pytest.fixture
async def admitting() -> AsyncIterator[Served]:
    async with serving(admit=True) as s:
        yield s


async def test_admit_gives_the_route_its_context(admitting: Served) -> None:
    conn = await admitting.connect()
    await conn.send(post("/context", b"body", "Authorization: Bearer good"))
    a = await conn.answer()
    assert (a.status, a.body) == (200, b"Bearer good body")
    assert a.headers.getall("X-Key") == ["Bearer good"] and a.headers["X-Request-ID"] == "req-1"
    assert admitting.routes.admitted == ["/context"]


async def test_a_refused_request_whose_body_came_keeps_the_connection(admitting: Served) -> None:
    # The body is in hand, so the connection can still be framed: the refusal is an answer like another.
    conn = await admitting.connect()
    await conn.send(post("/fast", b"x", "Authorization: Bearer bad") + post("/fast", b"y", "Authorization: Bearer ok")
                    + post("/fast", b"z", "Authorization: Bearer bad"))
    a = await conn.answer()
    assert (a.status, a.error()["code"], a.headers["X-Key"]) == (401, "invalid_api_key", "Bearer bad")
    assert "Connection" not in a.headers
    assert (await conn.answer()).body == b"y"
    assert (await conn.answer()).status == 401
    await conn.send(post("/fast", b"w", "Authorization: Bearer ok"))
    assert (await conn.answer()).body == b"w"
    assert admitting.routes.calls == ["/fast", "/fast"]


async def test_a_refused_request_is_answered_before_its_body(admitting: Served) -> None:
    # Refused from its head: no 100 Continue, and the body is not waited for (the connection closes).
    conn = await admitting.connect()
    await conn.send(post("/fast", b"", "Content-Length: 100", "Expect: 100-continue", "Authorization: Bearer bad"))
    a = await conn.answer()
    assert (a.status, a.headers["Connection"]) == (401, "close")
    assert await conn.rest() == b""
    assert admitting.routes.calls == []


async def test_an_admit_that_fails_is_a_500(admitting: Served) -> None:
    conn = await admitting.connect()
    await conn.send(post("/fast", b"x", "Authorization: Bearer bug"))
    a = await conn.answer()
    assert (a.status, a.error()["code"]) == (500, "internal_error")


async def test_admit_is_only_asked_about_requests_this_server_reads(admitting: Served) -> None:
    conn = await admitting.connect()
    await conn.send(post("/fast", b"", f"Content-Length: {MAX_BODY + 1}"))
    assert (await conn.answer()).status == 413
    conn = await admitting.connect()
    await conn.send(b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await conn.answer()).body == b"aiohttp"
    assert admitting.routes.admitted == []


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


# --- streamed answers ----------------------------------------------------------------------------------------


async def test_a_stream_is_chunked_for_http11(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/stream"))
    a = await conn.answer()
    assert (a.status, a.chunks) == (200, [b"one", b"two", b"three"])
    assert "Content-Length" not in a.headers and "Connection" not in a.headers
    assert a.headers["Content-Type"] == "text/plain" and a.headers["X-Request-ID"] == "req-1"
    # The connection stays usable after the last chunk.
    await conn.send(post("/fast", b"after"))
    assert (await conn.answer()).body == b"after"


async def test_chunked_framing_exactly(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/stream", b"", "Connection: close"))
    raw = await conn.rest()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head + b"\r\n"
    assert body == b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"


async def test_a_stream_to_an_http10_client_ends_with_the_connection(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/stream", version="HTTP/1.0"))
    a = await conn.answer()  # neither Content-Length nor chunked: read to the close
    assert (a.status, a.body, a.headers["Connection"]) == (200, b"onetwothree", "close")
    assert "Transfer-Encoding" not in a.headers and "Content-Length" not in a.headers


# --- errors ---------------------------------------------------------------------------------------------------


ERRORS = [
    ("/fail", 500, "server_error", "internal_error", None),
    ("/noanswer", 500, "server_error", "internal_error", None),  # a route that forgot to answer is a bug
    ("/apierror", 404, "not_found_error", "model_not_found", None),
    ("/invalid", 400, "invalid_request_error", "invalid_value", "model"),
]


@pytest.mark.parametrize(("path", "status", "type_", "code", "param"), ERRORS, ids=[e[0] for e in ERRORS])
async def test_a_route_that_raises_is_answered_in_the_openai_shape(
        served: Served, path: str, status: int, type_: str, code: str, param: str | None) -> None:
    conn = await served.connect()
    await conn.send(post(path))
    a = await conn.answer()
    error = a.error()
    assert (a.status, error["type"], error["code"], error["param"]) == (status, type_, code, param)
    assert "Traceback" not in error["message"] and "a bug" not in error["message"]
    assert a.headers["X-Request-ID"] == "req-1"
    # An error is an answer like another: the connection stays open.
    await conn.send(post("/fast", b"next"))
    assert (await conn.answer()).body == b"next"


async def test_a_route_that_raises_after_starting_breaks_the_connection(served: Served) -> None:
    conn = await served.connect()
    await conn.send(post("/fail-after-start"))
    head = await conn.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    try:
        rest = await conn.rest()
    except ConnectionResetError:
        rest = b""
    # What was written arrives, but never the last chunk: the client cannot take it for a whole answer.
    assert b"0\r\n\r\n" not in rest and rest in (b"", b"7\r\npartial\r\n")


async def test_a_real_client_sees_a_broken_stream(served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{served.url}/fail-after-start") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


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


async def test_shutdown_breaks_off_what_is_still_busy_at_the_timeout() -> None:
    async with serving(shutdown_timeout_s=0.1) as served:
        busy = await served.connect()
        await busy.send(post("/hold"))
        await until(served.routes.held.is_set)
        async with asyncio.timeout(5):
            await served.runner.cleanup()
        try:
            assert await busy.rest() == b""
        except ConnectionResetError:
            pass  # aborted: a reset is as good as an end here
        await until(served.routes.cancelled.is_set)
