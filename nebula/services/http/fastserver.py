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
- a connection idle past `keepalive_s` (between requests, nothing of the next one received) is closed;
- caps on connections (in all, per client, a reserve for the operator's paths) and deadlines (the whole
  head, the whole body, the whole request, a write the client does not read): admission.py says which
  and why. A request's resources (the gateway: its key's concurrency slot, taken by `admit`) are given
  back through its `release` on every path: answered, refused, client gone, error, deadline;
- on shutdown, idle connections close at once, busy ones after their answer, the rest at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, cast

from multidict import CIMultiDict

from nebula.adapters.http1_request import MAX_HEAD, BadRequest, RequestHead, parse_request_head
from nebula.services.http.admission import (
    RESERVE_HEAD_S,
    RESERVE_LIFETIME_S,
    Census,
    ConnectionEvents,
    ConnectionLimits,
    HandedOver,
    NoEvents,
    Ticket,
    client_key,
)
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.errors import ApiError, as_api_error, unavailable

log = logging.getLogger(__name__)

KEEPALIVE_S = 75.0  # aiohttp's default
LINGER_S = 5.0  # how long a refused client may go on sending (nginx's lingering_timeout)
_MAX_AHEAD = 256 * 1024  # bytes a pipelining client may send ahead of its answers before reading pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REFUSAL_CODES = {400: "bad_request", 408: "request_timeout", 413: "request_too_large",
                  431: "request_header_fields_too_large", 501: "not_implemented", 505: "http_version_not_supported"}
Clock = Callable[[], float]


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
    # Set by `admit` when it holds something for the request (the gateway: its key's concurrency slot); the
    # server calls it once, when the request ends however it ends.
    release: Callable[[], None] | None = None


Route = Callable[[FastRequest, ConnectionReply], Awaitable[None]]
# (method, path) -> the route that serves it here, or None: aiohttp takes the connection.
Router = Callable[[str, str], Route | None]
# Checks a routed request from its head, before its body is read: raises (ApiError) to refuse it, may set
# its `context`, `extra_headers` and `release` for the route.
Admit = Callable[[FastRequest], None]


async def _refused(request: FastRequest, reply: ConnectionReply) -> None:
    # Mostly a marker: a refused request is answered by its connection at once. Run only when the client is
    # not reading its answers, so that the refusal (through _answer) waits for it like any answer.
    raise request.context


_REFUSED: Route = _refused


class FastServer:
    """The connections of one site and what they share: the router, aiohttp's protocol factory (for the
    connections it takes over), the limits and the connection census. Called, it makes a connection's
    protocol."""

    def __init__(self, router: Router, fallback: Callable[[], asyncio.BaseProtocol], max_body: int,
                 keepalive_s: float = KEEPALIVE_S, admit: Admit | None = None,
                 limits: ConnectionLimits | None = None, events: ConnectionEvents | None = None,
                 reserve_paths: frozenset[str] = frozenset(), clock: Clock = time.monotonic) -> None:
        self.router = router
        self.admit = admit
        self.fallback = fallback
        self.max_body = max_body
        self.keepalive_s = keepalive_s
        self.limits = limits or ConnectionLimits()
        self.events: ConnectionEvents = events or NoEvents()
        self.reserve_paths = reserve_paths
        self.clock = clock
        self.census = Census(self.limits)
        self.connections: set[FastConnection] = set()
        # Connections waiting for a request with nothing of it received, the longest idle first (a dict
        # keeps insertion order): the sweep stops at the first one not yet due, and at the cap the first
        # one makes room, both without a scan.
        self.idle: dict[FastConnection, None] = {}
        self.reserved: set[HandedOver] = set()  # reserve connections aiohttp serves, until their expiry
        self.closing = False
        self._all_closed = asyncio.Event()
        self._date = ""
        self._date_at = -1

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    @property
    def open(self) -> int:
        """Connections open, those aiohttp serves included."""
        return self.census.open

    def sweep_interval(self) -> float:
        """How often `sweep` runs: a quarter of the shortest limit, between half a second and 5 s, so a
        deadline is kept to within a quarter of itself without a timer per connection."""
        lim = self.limits
        return min(5.0, max(0.5, min(self.keepalive_s, lim.header_timeout_s, lim.body_timeout_s,
                                     lim.write_timeout_s) / 4))

    def date(self) -> str:
        """The Date header's value (RFC 9110 6.6.1), formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def enter(self, conn: FastConnection, transport: asyncio.BaseTransport) -> Ticket | None:
        """Count a new connection in, making room by closing the longest idle one at the cap; None when it
        is refused (the caller closes it). Sets conn.reserve when it is taken from the reserve."""
        client = client_key(transport.get_extra_info("peername"))
        if self.census.client_full(client):
            self.events.refused("per_ip")
            return None
        if self.census.full():
            if self.idle:
                oldest = next(iter(self.idle))
                self.idle.pop(oldest)
                oldest.close()  # it stops counting now, not when its close is done
                self.events.reaped()
            elif self.reserve_paths and not self.census.reserve_full():
                conn.reserve = True
            else:
                self.events.refused("max_connections")
                return None
        return self.census.take(client)

    def forget(self, conn: FastConnection) -> None:
        self.connections.discard(conn)
        self.idle.pop(conn, None)
        if self.closing and not self.connections:
            self._all_closed.set()

    def sweep(self, now: float) -> int:
        """Close the connections idle since before `now` - keepalive_s and cut those past a deadline at
        `now` (a monotonic time: the tests pass one ahead of the clock); how many."""
        cutoff = now - self.keepalive_s
        stale = []
        for conn in self.idle:
            if conn.idle_since is None or conn.idle_since >= cutoff:
                break
            stale.append(conn)
        for conn in stale:
            self.idle.pop(conn, None)
            conn.close()
        write_cutoff = now - self.limits.write_timeout_s
        overdue = [c for c in self.connections if c.deadline <= now
                   or (c.blocked_since is not None and c.blocked_since <= write_cutoff)]
        for conn in overdue:
            conn.cut(now)
        expired = [h for h in self.reserved if h.expires_at <= now]
        for handed in expired:
            self.reserved.discard(handed)
            handed.close()
        return len(stale) + len(overdue) + len(expired)

    async def keep_sweeping(self) -> None:
        """sweep every sweep_interval() until cancelled: one timer for all connections, where one per
        connection would be re-armed on every request."""
        while True:
            await asyncio.sleep(self.sweep_interval())
            self.sweep(self.clock())

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
        "_started",
        "_task",
        "_ticket",
        "_timed_out",
        "_transport",
        "_waiting",
        "blocked_since",
        "deadline",
        "deadline_kind",
        "idle_since",
        "reserve",
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
        self._ticket: Ticket | None = None
        self._started = 0.0  # when the head of the request being read or answered was complete
        self._timed_out = False  # the answer under way was cut at the request deadline
        # Monotonic time since the connection waits for a request with nothing of it received; None otherwise.
        self.idle_since: float | None = None
        # When the sweep cuts the connection, and why ('header', 'body', 'request'); inf while idle.
        self.deadline = math.inf
        self.deadline_kind = ""
        self.blocked_since: float | None = None  # since when a write waits for the client to read
        self.reserve = False  # taken over the cap: for a reserve path only

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        self._ticket = server.enter(self, transport)
        if self._ticket is None:
            self._lost = True  # never ours: its connection_lost gives nothing back
            transport.close()
            return
        # A stream transport; uvloop's do not derive from asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        server.connections.add(self)
        now = server.clock()
        # The first head is due from the connection's start (a connection that sends nothing is cut here,
        # not at keepalive_s): as nginx's client_header_timeout.
        head_s = min(server.limits.header_timeout_s, RESERVE_HEAD_S) if self.reserve else server.limits.header_timeout_s
        self._expect("header", now + head_s)
        if not self.reserve:
            self._idle(now)

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._transport is None:
            return
        if self.idle_since is not None:
            self._busy()
        if isinstance(self._buf, bytearray):
            self._buf += data
        else:
            self._buf = self._buf + data if self._buf else data
        if self._task is None:
            self._advance()
        elif len(self._buf) > _MAX_AHEAD and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> None:
        # As aiohttp: a client that half-closes is taken to have left (the transport closes, and an
        # answer under way is cancelled), since that is how a departing client's FIN first shows.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticket is None:
            return  # refused at accept
        self._lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._server.census.give_back(self._ticket)
        self._server.forget(self)
        if self._waiting is not None:
            self._done_with(self._waiting[2])
            self._waiting = None
        if self._task is not None:
            self._task.cancel()  # the client left: its handler (and the engine request) stops
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()
        self.blocked_since = self._server.clock()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        self.blocked_since = None

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
        self.deadline = math.inf  # closing: only a write the client does not read can still hold it up
        if self._transport is not None:
            self._transport.close()
            if self._ticket is not None:
                self._server.census.give_back(self._ticket)  # closing: it no longer counts against the caps

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def last_answer(self) -> bool:
        """Whether the answer being written is to be this connection's last (shutdown began)."""
        return self._close_after

    def date(self) -> str:
        return self._server.date()

    def close_when_idle(self) -> None:
        if self._task is None:
            self.close()
        else:
            self._close_after = True

    # --- deadlines ----------------------------------------------------------------------------------------

    def _expect(self, kind: str, at: float) -> None:
        self.deadline, self.deadline_kind = at, kind

    def _idle(self, now: float) -> None:
        self.idle_since = now
        self._server.idle[self] = None

    def _busy(self) -> None:
        """The first byte of a request arrived on an idle connection: its head is due within header_timeout_s
        (unless the connection's first head already is)."""
        self.idle_since = None
        self._server.idle.pop(self, None)
        if self.deadline == math.inf:
            self._expect("header", self._server.clock() + self._server.limits.header_timeout_s)

    def cut(self, now: float) -> None:
        """The sweep found this connection past a deadline: end what it was doing, the cheapest way that
        still tells a client that is listening what happened."""
        limits = self._server.limits
        if self.blocked_since is not None and now - self.blocked_since >= limits.write_timeout_s:
            # The client does not read: no answer can reach it. The abort cancels the handler, which gives
            # back what the request held (the engine connection, the key's slot).
            self._server.events.cut("write")
            self.abort()
            return
        kind = self.deadline_kind
        self.deadline = math.inf
        self._server.events.cut(kind)
        if kind == "request" and self._task is not None:
            self._timed_out = True
            self._close_after = True
            self._task.cancel()  # _answer answers 504 if nothing was sent yet
        elif kind == "body":
            self._refuse(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                              "(gateway.body_timeout_s)")
        elif self._buf or self._waiting is not None:
            self._refuse(408, f"the request head did not arrive within {limits.header_timeout_s:g} s "
                              "(gateway.header_timeout_s)")
        else:
            self.close()  # nothing received: nobody to tell

    @staticmethod
    def _done_with(request: FastRequest) -> None:
        release, request.release = request.release, None
        if release is not None:
            release()

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
                self._done_with(request)
                reply.error_now(request.context)
                if not reply.keep_alive or self._server.closing:
                    self.close()
                    return
                self._next_request()
                continue
            self._expect("request", self._started + self._server.limits.request_timeout_s)
            self._task = asyncio.get_running_loop().create_task(self._answer(route, request, reply))

    def _next_request(self) -> None:
        """Between requests: idle when nothing of the next one is here yet, else its head is due."""
        if self._buf:
            self._expect("header", self._server.clock() + self._server.limits.header_timeout_s)
        else:
            self._expect("", math.inf)
            self._idle(self._server.clock())

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
        if self.reserve and not (head.method == "GET" and head.path in self._server.reserve_paths):
            self._server.events.refused("reserve_path")
            self._refuse(503, "the gateway is at its connection limit; retry shortly")
            return False
        route = None if head.unusual or head.chunked else self._server.router(head.method, head.path)
        if route is None:
            self._hand_over()
            return False
        if head.content_length > self._server.max_body:
            self._refuse(413, f"the request body ({head.content_length} bytes) is over the gateway's "
                              f"limit of {self._server.max_body} bytes (gateway.max_body_bytes)", head.path)
            return False
        buf = self._buf = buf[end + 4:]
        request = FastRequest(head.method, head.target, head.path, CIMultiDict(head.headers), b"")
        self._started = now = self._server.clock()
        limits = self._server.limits
        if self._server.admit is not None:
            try:
                self._server.admit(request)
            except Exception as e:
                # Refused before its body is read, so a client without a key cannot make the server hold
                # bodies. A body on its way is not waited for: the answer ends the connection.
                self._done_with(request)
                request.context = as_api_error(e, head.method, head.path)
                if len(buf) < head.content_length:
                    reply = ConnectionReply(self, False, head.http11, request.extra_headers)
                    reply.error_now(request.context)
                    self._linger()
                    return False
                route = _REFUSED
        self._waiting = (head, route, request)
        if len(buf) < head.content_length:
            # The whole body is due within body_timeout_s: a trickle of bytes does not extend it.
            self._expect("body", now + min(limits.body_timeout_s, limits.request_timeout_s))
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
            if self._timed_out and not self._lost:
                await self._answer_timeout(reply)
            elif not self._lost:
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
            self._done_with(request)
            self._answered(reply)

    async def _answer_timeout(self, reply: ConnectionReply) -> None:
        if reply.status:
            self.abort()  # the answer started: cut short, it must not look whole
            return
        limit = self._server.limits.request_timeout_s
        await reply.error(ApiError(504, f"the request took longer than {limit:g} s (gateway.request_timeout_s)",
                                   code="request_timeout"))

    def _answered(self, reply: ConnectionReply) -> None:
        self._expect("", math.inf)
        if self._lost:
            return
        if not reply.keep_alive or self._close_after or self._server.closing:
            self.close()
            return
        self._next_request()
        if self._buf:
            self._advance()
        # Read on once few requests are left ahead (resuming after every answer would let a client that
        # does not read grow the buffer by a read per answer), or when the next one needs more bytes.
        if self._reading_paused and self._transport is not None and (
                self._task is None or len(self._buf) <= _MAX_AHEAD):
            self._reading_paused = False
            self._transport.resume_reading()

    def _refuse(self, status: int, message: str, path: str = "") -> None:
        """Answer a request this server will not read, then close: what follows cannot be framed. `path`:
        the request's, when its head was read (its clients' error shape)."""
        err = (unavailable(message, code="too_many_connections") if status == 503
               else ApiError(status, message, code=_REFUSAL_CODES.get(status))).for_path(path)
        ConnectionReply(self, False, True, []).error_now(err)
        self._linger()

    def _linger(self) -> None:
        """End the connection after a refusal without losing the answer: closing with unread bytes makes the
        kernel reset the connection, and a client still sending its body would get the reset instead of the
        answer. So (as nginx's lingering close) end our side, drop what still arrives, and close when the
        client does or after LINGER_S."""
        if self._waiting is not None:
            self._done_with(self._waiting[2])
        self._buf = b""
        self._waiting = None
        self._discarding = True
        self.deadline = math.inf  # the linger timer ends it
        if self._transport is None:
            return
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def _hand_over(self) -> None:
        """Make aiohttp serve this connection from the request in the buffer on; it still counts (through
        HandedOver) until it closes."""
        transport = self._transport
        assert transport is not None and self._ticket is not None
        server = self._server
        server.forget(self)
        self._transport = None
        data, self._buf = self._buf, b""
        if self._reading_paused:
            transport.resume_reading()
        protocol = server.fallback()
        if isinstance(protocol, asyncio.Protocol):
            expires = server.clock() + RESERVE_LIFETIME_S if self.reserve else math.inf
            handed = HandedOver(protocol, transport, server.census, self._ticket, expires)
            if self.reserve:
                server.reserved.add(handed)
            transport.set_protocol(handed)
        else:  # not aiohttp's: nothing to stand between, so it stops counting here
            server.census.give_back(self._ticket)
            transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(data))
