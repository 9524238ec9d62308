"""The data-plane HTTP/1.1 server's answers over real loopback sockets: keep-alive and the shape of an answer,
Expect: 100-continue, streamed (chunked) answers, and routes that raise; raw clients check the exact bytes, and
aiohttp's client a real client's view (the server, its routes and the raw client: tests/harness/fastserver.py)."""

from __future__ import annotations

import asyncio
import time
from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from tests.harness.fastserver import CONTINUE, MAX_BODY, Served, from_aiohttp, post
from tests.unit.fastserver_fixtures import served_fixture  # noqa: F401 (the fixture served)

pytestmark = pytest.mark.timeout(60)


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
