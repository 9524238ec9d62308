"""The gateway's data-plane server: HTTP/1.1 on asyncio Protocols for the OpenAI paths, aiohttp for the rest.

Every connection starts here. A request whose method and path the router knows, with a plain body
(Content-Length framing), is read and answered by this server: one parse of the head, one task per
request, one write per answer (head and body together), chunked framing for a streamed body. Anything
else (the admin API, /metrics, a chunked upload, an Upgrade, a path the router does not know) makes the
connection aiohttp's: the bytes it holds from that request's first byte on are handed to an aiohttp
protocol, which serves the connection from then on. aiohttp serves the OpenAI paths too, so a connection
it took over loses nothing but speed.

Why: with its engine hop on a lean client (adapters/upstream_http.py), aiohttp's server side was the
largest part of the gateway's CPU per request (its request and response objects, router, middleware
chain and writer), as much as the gateway's own work.

Behaviour an HTTP/1.1 server owes its clients, as aiohttp gives it:
- keep-alive, and pipelined requests answered in order; Connection: close and HTTP/1.0 respected;
- `Expect: 100-continue` answered before the body is read;
- a body over `max_body` refused with 413 before it is read, a head over 64 KiB with 431, a malformed
  one with 400, all in the OpenAI error shape, then the connection closed;
- a client that goes away cancels its handler (as aiohttp's handler_cancellation), so the engine
  request is closed and the engine stops generating;
- writing waits while the client reads slowly (transport flow control), reading pauses while a
  pipelining client sends far ahead;
- a connection idle past `keepalive_s` (between requests, stuck in a head, or a big body that stopped
  coming) is closed;
- on shutdown, idle connections close at once, busy ones after their answer, the rest at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from multidict import CIMultiDict

from nebula.adapters.http1_request import MAX_HEAD, BadRequest, RequestHead, parse_request_head
from nebula.services.http.errors import ApiError, as_api_error

log = logging.getLogger(__name__)

KEEPALIVE_S = 75.0  # aiohttp's default
LINGER_S = 5.0  # how long a refused client may go on sending (nginx's lingering_timeout)
_MAX_AHEAD = 256 * 1024  # bytes a pipelining client may send ahead of its answers before reading pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_REFUSAL_CODES = {400: "bad_request", 413: "request_too_large", 431: "request_header_fields_too_large",
                  501: "not_implemented", 505: "http_version_not_supported"}


@dataclass(slots=True)
class FastRequest:
    method: str
    target: str  # path and query, as sent
    path: str
    headers: CIMultiDict[str]
    body: bytes
    # Added to whatever answer this request gets, errors included (the gateway's X-Request-ID).
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    # What the server's `admit` learned of the request (the gateway: the caller's API key).
    context: Any = None


Route = Callable[[FastRequest, "ConnectionReply"], Awaitable[None]]
# (method, path) -> the route that serves it here, or None: aiohttp takes the connection.
Router = Callable[[str, str], Route | None]
# Checks a routed request from its head, before its body is read: raises (ApiError) to refuse it, may set
# its `context` and `extra_headers` for the route.
Admit = Callable[[FastRequest], None]


async def _refused(request: FastRequest, reply: ConnectionReply) -> None:
    # Mostly a marker: a refused request is answered by its connection at once. Run only when the client is
    # not reading its answers, so that the refusal (through _answer) waits for it like any answer.
    raise request.context


_REFUSED: Route = _refused


class FastServer:
    """The connections of one site and what they share: the router, aiohttp's protocol factory (for the
    connections it takes over) and the limits. Called, it makes a connection's protocol."""

    def __init__(self, router: Router, fallback: Callable[[], asyncio.BaseProtocol], max_body: int,
                 keepalive_s: float = KEEPALIVE_S, admit: Admit | None = None) -> None:
        self.router = router
        self.admit = admit
        self.fallback = fallback
        self.max_body = max_body
        self.keepalive_s = keepalive_s
        self.connections: set[FastConnection] = set()
        self.closing = False
        self._all_closed = asyncio.Event()
        self._date = ""
        self._date_at = -1

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    def date(self) -> str:
        """The Date header's value (RFC 9110 6.6.1), formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def forget(self, conn: FastConnection) -> None:
        self.connections.discard(conn)
        if self.closing and not self.connections:
            self._all_closed.set()

    def close_idle(self, now: float) -> int:
        """Close the connections idle (waiting for a request) since before `now` - keepalive_s; how many."""
        cutoff = now - self.keepalive_s
        idle = [c for c in self.connections if c.idle_since is not None and c.idle_since < cutoff]
        for conn in idle:
            conn.close()
        return len(idle)

    async def keep_closing_idle(self) -> None:
        """close_idle every so often (a quarter of keepalive_s, at least a second) until cancelled: one timer
        for all connections, where one per connection would be re-armed on every request."""
        while True:
            await asyncio.sleep(max(1.0, self.keepalive_s / 4))
            self.close_idle(time.monotonic())

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections now and busy ones after their answer; abort what is left at the timeout."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout_s)
            except TimeoutError:
                log.warning("%d data-plane connections still busy after %.0f s; closing them",
                            len(self.connections), timeout_s)
        for conn in list(self.connections):
            conn.abort()


class FastConnection(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_close_after",
        "_discarding",
        "_drain",
        "_linger_timer",
        "_lost",
        "_reading_paused",
        "_server",
        "_task",
        "_transport",
        "_waiting",
        "idle_since",
    )

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf: bytes | bytearray = b""
        # The request whose head was read and whose body is still arriving.
        self._waiting: tuple[RequestHead, Route, FastRequest] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._lost = False
        self._reading_paused = False
        self._close_after = False
        self._discarding = False  # after a refusal: what arrives is dropped
        self._linger_timer: asyncio.TimerHandle | None = None
        # Monotonic time since the connection waits for a request; None while one is being answered.
        self.idle_since: float | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not derive from asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self.idle_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if isinstance(self._buf, bytearray):
            self._buf += data
            self.idle_since = time.monotonic()  # a big body on its way: idle is no progress, not no answer
        else:
            self._buf = self._buf + data if self._buf else data
        if self._task is None:
            self._advance()
        elif len(self._buf) > _MAX_AHEAD and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> None:
        # As aiohttp: a client that half-closes is taken to have left (the transport closes, and an
        # answer under way is cancelled), since that is how a departing client's FIN first shows.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._server.forget(self)
        if self._task is not None:
            self._task.cancel()  # the client left: its handler (and the engine request) stops
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # --- for the reply --------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._lost or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)
        if self._drain is not None:
            await self._drain
            if self._lost:
                raise ConnectionResetError("the client closed the connection")

    def write_now(self, data: bytes) -> None:
        if not self._lost and self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self) -> None:
        if self._task is None:
            self.close()
        else:
            self._close_after = True

    # --- reading requests ------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start answering the next complete request in the buffer, if there is one."""
        while self._task is None and self._transport is not None:
            if self._waiting is None and not self._read_head():
                return
            assert self._waiting is not None
            head, route, request = self._waiting
            buf, n = self._buf, head.content_length
            if len(buf) < n:
                return
            self._waiting = None
            if isinstance(buf, bytearray):
                request.body, self._buf = bytes(buf[:n]), bytes(buf[n:])
            elif len(buf) == n:
                request.body, self._buf = buf, b""
            else:
                request.body, self._buf = buf[:n], buf[n:]
            # An HTTP/1.0 client is answered once: keep-alive there is an old extension not worth its cases.
            reply = ConnectionReply(self, head.keep_alive and head.http11 and not self._close_after, head.http11,
                                    request.extra_headers)
            if route is _REFUSED and self._drain is None:
                reply.error_now(request.context)
                if not reply.keep_alive or self._server.closing:
                    self.close()
                    return
                continue
            self.idle_since = None
            self._task = asyncio.get_running_loop().create_task(self._answer(route, request, reply))

    def _read_head(self) -> bool:
        """Parse the head in the buffer into self._waiting; False when there is none (yet, or any more)."""
        buf = self._buf
        if buf.startswith(b"\r\n"):
            buf = self._buf = buf.lstrip(b"\r\n")  # RFC 9112 2.2: empty lines before a request
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._refuse(431, "request head too large")
            return False
        try:
            head = parse_request_head(bytes(buf[:end]))
        except BadRequest as e:
            self._refuse(e.status, e.message)
            return False
        route = None if head.unusual or head.chunked else self._server.router(head.method, head.path)
        if route is None:
            self._hand_over()
            return False
        if head.content_length > self._server.max_body:
            self._refuse(413, f"the request body ({head.content_length} bytes) is over the gateway's "
                              f"limit of {self._server.max_body} bytes (gateway.max_body_bytes)")
            return False
        buf = self._buf = buf[end + 4:]
        request = FastRequest(head.method, head.target, head.path, CIMultiDict(head.headers), b"")
        if self._server.admit is not None:
            try:
                self._server.admit(request)
            except Exception as e:
                # Refused before its body is read, so a client without a key cannot make the server hold
                # bodies. A body on its way is not waited for: the answer ends the connection.
                request.context = as_api_error(e, head.method, head.path)
                if len(buf) < head.content_length:
                    reply = ConnectionReply(self, False, head.http11, request.extra_headers)
                    reply.error_now(request.context)
                    self._linger()
                    return False
                route = _REFUSED
        self._waiting = (head, route, request)
        if len(buf) < head.content_length:
            if head.content_length > _MAX_AHEAD:
                # A big body comes in many reads: gather it in place, not by copying all of it per read.
                self._buf = bytearray(buf)
            if head.expect_continue:
                self.write_now(_CONTINUE)
        return True

    async def _answer(self, route: Route, request: FastRequest, reply: ConnectionReply) -> None:
        try:
            await route(request, reply)
            if not reply.done:
                raise RuntimeError(f"{request.method} {request.path}: the handler returned without a full answer")
        except asyncio.CancelledError:
            if not self._lost:
                raise  # cancelled for another reason than the client leaving
        except Exception as e:
            if self._lost:
                pass  # the client left while the answer was being written
            elif reply.status:
                log.error("%s %s failed after its answer started", request.method, request.path, exc_info=e)
                self.abort()
            else:
                err = as_api_error(e, request.method, request.path)
                await reply.error(err)
        finally:
            self._task = None
            self._answered(reply)

    def _answered(self, reply: ConnectionReply) -> None:
        if self._lost:
            return
        if not reply.keep_alive or self._close_after or self._server.closing:
            self.close()
            return
        self.idle_since = time.monotonic()
        if self._buf:
            self._advance()
        # Read on once few requests are left ahead (resuming after every answer would let a client that
        # does not read grow the buffer by a read per answer), or when the next one needs more bytes.
        if self._reading_paused and self._transport is not None and (
                self._task is None or len(self._buf) <= _MAX_AHEAD):
            self._reading_paused = False
            self._transport.resume_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request this server will not read, then close: what follows cannot be framed."""
        ConnectionReply(self, False, True, []).error_now(ApiError(status, message, code=_REFUSAL_CODES.get(status)))
        self._linger()

    def _linger(self) -> None:
        """End the connection after a refusal without losing the answer: closing with unread bytes makes the
        kernel reset the connection, and a client still sending its body would get the reset instead of the
        answer. So (as nginx's lingering close) end our side, drop what still arrives, and close when the
        client does or after LINGER_S."""
        self._buf = b""
        self._waiting = None
        self._discarding = True
        if self._transport is None:
            return
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def _hand_over(self) -> None:
        """Make aiohttp serve this connection from the request in the buffer on."""
        transport = self._transport
        assert transport is not None
        self._server.forget(self)
        self._transport = None
        data, self._buf = self._buf, b""
        if self._reading_paused:
            transport.resume_reading()
        protocol = self._server.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(data))


def _head_bytes(status: int, reason: str, headers: Iterable[tuple[str, str]], date: str, framing: str,
                keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or _PHRASES.get(status, 'Unknown')}\r\nDate: {date}\r\n"]
    if framing:
        lines.append(f"{framing}\r\n")
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    lines.append("\r\n" if keep_alive else "Connection: close\r\n\r\n")
    return "".join(lines).encode("latin-1")


class ConnectionReply:
    """A Reply (services/http/reply.py) on a FastConnection. A streamed body goes out chunked (close-
    delimited to an HTTP/1.0 client); its head waits for the first piece, so they share a write."""

    __slots__ = ("_chunked", "_conn", "_http11", "_pending", "done", "extra_headers", "keep_alive", "status")

    def __init__(self, conn: FastConnection, keep_alive: bool, http11: bool,
                 extra_headers: list[tuple[str, str]]) -> None:
        self._conn = conn
        self._http11 = http11
        self._chunked = False
        self._pending = b""
        self.keep_alive = keep_alive
        self.status = 0
        self.done = False
        self.extra_headers = extra_headers  # the request's: a route may add to them until the answer starts

    def _head(self, status: int, reason: str, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
        self.status = status
        if self._conn._close_after:
            self.keep_alive = False  # shutdown began since the request came: say this answer is the last
        if self.extra_headers:
            headers = [*headers, *self.extra_headers]
        return _head_bytes(status, reason, headers, self._conn._server.date(), framing, self.keep_alive)

    async def send(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        head = self._head(status, reason, headers, f"Content-Length: {len(body)}")
        self.done = True
        await self._conn.send(head + body)

    async def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]]) -> None:
        if self._http11:
            self._chunked = True
            framing = "Transfer-Encoding: chunked"
        else:
            self.keep_alive = False  # the body ends when the connection does
            framing = ""
        self._pending = self._head(status, reason, headers, framing)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        piece = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if self._pending:
            piece, self._pending = self._pending + piece, b""
        await self._conn.send(piece)

    async def end(self) -> None:
        piece = self._pending + (b"0\r\n\r\n" if self._chunked else b"")
        self._pending = b""
        self.done = True
        if piece:
            await self._conn.send(piece)

    def abort(self) -> None:
        self._conn.abort()

    def _error_bytes(self, err: ApiError) -> bytes:
        body = err.body()
        headers = [("Content-Type", "application/json"), *err.headers.items()]
        self.done = True
        return self._head(err.status, "", headers, f"Content-Length: {len(body)}") + body

    async def error(self, err: ApiError) -> None:
        """`err` as the answer, in the OpenAI shape."""
        try:
            await self._conn.send(self._error_bytes(err))
        except ConnectionResetError:
            pass

    def error_now(self, err: ApiError) -> None:
        """`err` as the answer, written without waiting for the client to read it (a refusal's)."""
        self._conn.write_now(self._error_bytes(err))


class FastSite(web.BaseSite):
    """A listening TCP site (like aiohttp's TCPSite) whose connections start on the data-plane server."""

    __slots__ = ("_fast", "_host", "_port", "_reuse_port", "_shutdown_timeout_s", "_sweeper")

    def __init__(self, runner: web.BaseRunner, router: Router, host: str, port: int, *, max_body: int,
                 ssl_context: Any = None, reuse_port: bool = False, keepalive_s: float = KEEPALIVE_S,
                 shutdown_timeout_s: float = 60.0, admit: Admit | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        server = runner.server
        assert server is not None  # BaseSite checked it
        self._fast = FastServer(router, server, max_body, keepalive_s, admit)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the asked one, or the one the system chose for 0)."""
        # uvloop's server is no asyncio.Server, but has its sockets too.
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    @property
    def connections(self) -> int:
        return len(self._fast.connections)

    @property
    def server(self) -> FastServer:
        return self._fast

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._fast, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=True,
                                                reuse_port=self._reuse_port or None)
        self._sweeper = loop.create_task(self._fast.keep_closing_idle(), name="fastserver-idle")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._fast.shutdown(self._shutdown_timeout_s)
        await super().stop()
