"""What the data-plane HTTP/1.1 server refuses, over real loopback sockets: bodies and heads over the limits,
malformed requests, and requests its admit check refuses from the head
(the server, its routes and the raw client: tests/harness/fastserver.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.harness.fastserver import MAX_BODY, Served, post, serving, until
from tests.unit.fastserver_fixtures import served_fixture  # noqa: F401 (the fixture served)

pytestmark = pytest.mark.timeout(60)


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
