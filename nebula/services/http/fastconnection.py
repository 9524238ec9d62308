"""One connection of the data-plane server (fastserver.py): reading requests off it, answering them in order,
its deadlines, refusals and the hand-over to aiohttp. What it owes its clients is in fastserver.py's docstring."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Final, cast

from multidict import CIMultiDict

from nebula.adapters.http1_request import MAX_HEAD, BadRequest, RequestHead, parse_request_head
from nebula.services.http.admission import RESERVE_HEAD_S, Ticket
from nebula.services.http.connection_reply import ConnectionReply
from nebula.services.http.errors import ApiError, as_api_error, refusal
from nebula.services.http.fastrequest import REFUSED, FastRequest, Route

if TYPE_CHECKING:
    from nebula.services.http.fastserver import FastServer

log = logging.getLogger(__name__)

LINGER_S: Final = 5.0  # how long a refused client may go on sending (nginx's lingering_timeout)
_MAX_AHEAD: Final = 256 * 1024  # bytes a pipelining client may send ahead of its answers before reading pauses
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class FastConnection(asyncio.Protocol):
    __slots__ = ("_buf", "_close_after", "_discarding", "_drain", "_linger_timer", "_loop", "_lost", "_reading_paused",
                 "_server", "_started", "_task", "_ticket", "_timed_out", "_transport", "_waiting",
                 "blocked_since", "deadline", "deadline_kind", "idle_since", "reserve")

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # kept: on Python 3.11 each call is a getpid() system call
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
            self._waiting[2].finish()
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
        await self.drained()

    def write_now(self, data: bytes) -> bool:
        """Write without waiting; False when the client is not reading fast enough (await drained)."""
        if not self._lost and self._transport is not None:
            self._transport.write(data)
        return self._drain is None

    async def drained(self) -> None:
        if self._drain is not None:
            await self._drain
            if self._lost:
                raise ConnectionResetError("the client closed the connection")

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
            self._refuse(
                408, f"the request body did not arrive within {limits.body_timeout_s:g} s (gateway.body_timeout_s)"
            )
        elif self._buf or self._waiting is not None:
            self._refuse(
                408, f"the request head did not arrive within {limits.header_timeout_s:g} s (gateway.header_timeout_s)"
            )
        else:
            self.close()  # nothing received: nobody to tell

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
            reply = ConnectionReply(
                self, head.keep_alive and head.http11 and not self._close_after, head.http11, request.extra_headers
            )
            if route is REFUSED and self._drain is None:
                request.finish()
                reply.error_now(request.context)
                if not reply.keep_alive or self._server.closing:
                    self.close()
                    return
                self._next_request()
                continue
            self._expect("request", self._started + self._server.limits.request_timeout_s)
            self._task = self._loop.create_task(self._answer(route, request, reply))

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
        except BadRequest as bad:  # not `e`: compiled code gives a name one type per function (the except below)
            self._refuse(bad.status, bad.message)
            return False
        if self.reserve and not (head.method == "GET" and head.path in self._server.reserve_paths):
            self._server.events.refused("reserve_path")
            self._refuse(503, "the gateway is at its connection limit; retry shortly")
            return False
        route = None if head.unusual or head.chunked else self._server.router(head.method, head.path)
        if route is None:
            self._hand_over()
            return False
        limit = self._server.body_limits.get(head.path, self._server.default_body_limit)
        if head.content_length > limit.max_bytes:
            self._refuse(
                413,
                f"the request body ({head.content_length} bytes) is over the gateway's "
                f"limit of {limit.max_bytes} bytes ({limit.setting})",
                head.path,
            )
            return False
        buf = self._buf = buf[end + 4 :]
        request = FastRequest(head.method, head.target, head.path, CIMultiDict(head.headers), b"")
        self._started = now = self._server.clock()
        limits = self._server.limits
        if self._server.admit is not None:
            try:
                self._server.admit(request)
            except Exception as e:
                # Refused before its body is read, so a client without a key cannot make the server hold
                # bodies. A body on its way is not waited for: the answer ends the connection.
                request.finish()
                request.context = as_api_error(e, head.method, head.path)
                if len(buf) < head.content_length:
                    reply = ConnectionReply(self, False, head.http11, request.extra_headers)
                    reply.error_now(request.context)
                    self._linger()
                    return False
                route = REFUSED
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
            request.finish()
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
        if (
            self._reading_paused
            and self._transport is not None
            and (self._task is None or len(self._buf) <= _MAX_AHEAD)
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    def _refuse(self, status: int, message: str, path: str = "") -> None:
        """Answer a request this server will not read, then close: what follows cannot be framed. `path`:
        the request's, when its head was read (its clients' error shape)."""
        ConnectionReply(self, False, True, []).error_now(refusal(status, message, path))
        self._linger()

    def _linger(self) -> None:
        """End the connection after a refusal without losing the answer: closing with unread bytes makes the
        kernel reset the connection, and a client still sending its body would get the reset instead of the
        answer. So (as nginx's lingering close) end our side, drop what still arrives, and close when the
        client does or after LINGER_S."""
        if self._waiting is not None:
            self._waiting[2].finish()
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
        """Make aiohttp serve this connection from the request in the buffer on (FastServer.hand_over)."""
        transport, self._transport = self._transport, None
        assert transport is not None and self._ticket is not None
        data, self._buf = self._buf, b""
        if self._reading_paused:
            transport.resume_reading()
        self._server.hand_over(self, transport, self._ticket, data)
