"""The data-plane server (services/http/fastserver.py) served for tests, and a raw HTTP/1.1 client for them:
raw connections to send and check exact bytes, a reader of one answer, a request builder. Behind the server a
small aiohttp app takes the connections the router does not know, and answers its own POST /fast with
"served by aiohttp: ..." so a test can tell who answered."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from nebula.errors import ValidationError
from nebula.services.http.admission import ConnectionLimits
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.errors import ApiError
from nebula.services.http.fastrequest import FastRequest, Route
from nebula.services.http.fastserver import FastServer
from nebula.services.http.site import FastSite

MAX_BODY = 1024
KEEPALIVE_S = 60.0  # with the default deadlines (20 s and more) the site's own sweep cuts nothing in a test
BIG = random.Random(0).randbytes(16 * 1024 * 1024)  # random, so a lost or reordered piece shows
PIECE = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# --- the server under test ---------------------------------------------------------------------------


class Routes:
    """The fast routes, and what the tests watch of them. Every request gets an X-Request-ID through
    extra_headers, as the gateway does, so a test can check it is on every answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.admitted: list[str] = []
        self.released: list[str] = []  # requests whose `release` the server called (admit sets it)
        self.held = asyncio.Event()  # /hold is waiting
        self.release = asyncio.Event()  # lets /hold answer
        self.cancelled = asyncio.Event()  # /hold was cancelled
        self.big_written = 0  # bytes /big has handed to its reply
        self.big_done = asyncio.Event()
        self._ids = itertools.count(1)
        self._table: dict[tuple[str, str], Route] = {
            ("POST", "/fast"): self.echo, ("POST", "/stream"): self.stream, ("POST", "/fail"): self.fail,
            ("POST", "/apierror"): self.apierror, ("POST", "/invalid"): self.invalid,
            ("POST", "/noanswer"): self.noanswer, ("POST", "/fail-after-start"): self.fail_after_start,
            ("POST", "/hold"): self.hold, ("POST", "/big"): self.big, ("POST", "/context"): self.context,
        }

    def admit(self, request: FastRequest) -> None:
        """As the gateway's key check: from the head alone, before the body is read."""
        key = request.headers.get("Authorization", "")
        self.admitted.append(request.path)
        request.extra_headers.append(("X-Key", key or "none"))
        if key == "Bearer bad":
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if key == "Bearer bug":
            raise RuntimeError("a bug in admit")
        request.context = key
        request.release = lambda: self.released.append(request.path)

    def router(self, method: str, path: str) -> Route | None:
        route = self._table.get((method, path))
        if route is None:
            return None

        async def with_id(request: FastRequest, reply: ConnectionReply) -> None:
            request.extra_headers.append(("X-Request-ID", f"req-{next(self._ids)}"))
            self.calls.append(path)
            await route(request, reply)
        return with_id

    async def echo(self, request: FastRequest, reply: ConnectionReply) -> None:
        await reply.send(200, "", [("Content-Type", "application/octet-stream")], request.body)

    async def context(self, request: FastRequest, reply: ConnectionReply) -> None:
        await reply.send(200, "", [], f"{request.context} {request.body.decode()}".encode())

    async def stream(self, request: FastRequest, reply: ConnectionReply) -> None:
        await reply.start(200, "", [("Content-Type", "text/plain")])
        for piece in (b"one", b"", b"two", b"three"):  # an empty write must not end the chunked body
            await reply.write(piece)
        await reply.end()

    async def fail(self, request: FastRequest, reply: ConnectionReply) -> None:
        raise RuntimeError("a bug")

    async def apierror(self, request: FastRequest, reply: ConnectionReply) -> None:
        raise ApiError(404, "no such model", code="model_not_found")

    async def invalid(self, request: FastRequest, reply: ConnectionReply) -> None:
        raise ValidationError("model", "is required")

    async def noanswer(self, request: FastRequest, reply: ConnectionReply) -> None:
        return None

    async def fail_after_start(self, request: FastRequest, reply: ConnectionReply) -> None:
        await reply.start(200, "", [("Content-Type", "text/plain")])
        await reply.write(b"partial")
        raise RuntimeError("broke mid-stream")

    async def hold(self, request: FastRequest, reply: ConnectionReply) -> None:
        self.held.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await reply.send(200, "", [], b"held")

    async def big(self, request: FastRequest, reply: ConnectionReply) -> None:
        await reply.start(200, "", [("Content-Type", "application/octet-stream")])
        for i in range(0, len(BIG), PIECE):
            await reply.write(BIG[i:i + PIECE])
            self.big_written = i + PIECE
        await reply.end()
        self.big_done.set()


async def aiohttp_other(request: web.Request) -> web.Response:
    return web.Response(text="aiohttp")


async def aiohttp_fast(request: web.Request) -> web.Response:
    return web.Response(body=b"served by aiohttp: " + await request.read())


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        return await read_answer(self.reader)

    async def rest(self) -> bytes:
        """Everything up to the server's close (failing the test if it does not close)."""
        async with asyncio.timeout(5):
            return await self.reader.read()


class Events:
    """What the server reported of refused and cut connections (the gateway counts them in its metrics)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def refused(self, reason: str) -> None:
        self.counts[f"refused:{reason}"] += 1

    def reaped(self) -> None:
        self.counts["reaped"] += 1

    def cut(self, deadline: str) -> None:
        self.counts[f"cut:{deadline}"] += 1


@dataclass
class Served:
    runner: web.AppRunner
    site: FastSite
    routes: Routes
    events: Events
    conns: list[Conn] = field(default_factory=list)

    @property
    def server(self) -> FastServer:
        return self.site.server  # the tests drive its sweep and read its connections

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.site.port}"

    async def connect(self, rcvbuf: int = 0, source: str = "") -> Conn:
        """A raw client connection (`rcvbuf`: a small receive buffer, so a client that does not read holds
        back little; `source`: a loopback address to come from, as another client); closed at the end of the
        test."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window
        if source:
            sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.site.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        return conn


@contextlib.asynccontextmanager
async def serving(keepalive_s: float = KEEPALIVE_S, shutdown_timeout_s: float = 5.0, admit: bool = False,
                  max_body: int = MAX_BODY, limits: ConnectionLimits | None = None,
                  reserve_paths: frozenset[str] = frozenset()) -> AsyncIterator[Served]:
    app = web.Application()
    app.router.add_get("/other", aiohttp_other)
    app.router.add_post("/fast", aiohttp_fast)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    routes = Routes()
    events = Events()
    site = FastSite(runner, routes.router, "127.0.0.1", 0, max_body=max_body, keepalive_s=keepalive_s,
                    shutdown_timeout_s=shutdown_timeout_s, admit=routes.admit if admit else None, limits=limits,
                    events=events, reserve_paths=reserve_paths)
    await site.start()
    served = Served(runner, site, routes, events)
    try:
        yield served
    finally:
        for conn in served.conns:
            conn.writer.close()
        if runner.server is not None:  # a test may have cleaned up already
            await runner.cleanup()



# --- reading answers -------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    chunks: list[bytes] | None = None  # a chunked body's pieces as framed

    def error(self) -> dict[str, Any]:
        assert self.headers["Content-Type"] == "application/json"
        payload = json.loads(self.body)
        assert isinstance(payload, dict) and set(payload) == {"error"}
        error = payload["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
        return error


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer, framed by its Content-Length, chunked, or (neither) by the server's close."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, sep, value = line.partition(": ")
            assert sep, line
            headers.add(name, value)
        if "Content-Length" in headers:
            assert "Transfer-Encoding" not in headers
            return Answer(int(status), headers, await reader.readexactly(int(headers["Content-Length"])))
        if "Transfer-Encoding" in headers:
            assert headers["Transfer-Encoding"] == "chunked"
            chunks: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                assert data[-2:] == b"\r\n"
                if not size:
                    return Answer(int(status), headers, b"".join(chunks), chunks)
                chunks.append(data[:-2])
        return Answer(int(status), headers, await reader.read())


def post(path: str, body: bytes = b"", *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Host: gw", *headers]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def until(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    """Yield to the loop until `cond` holds. Loopback bytes are there by the next turn or two of the loop, so
    this yields (sleep(0)) rather than polling at an interval as fake_engine.until does."""
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0)


def from_aiohttp(a: Answer) -> bool:
    return "aiohttp" in a.headers.get("Server", "")  # the fast server sends no Server header
