"""A lean HTTP/1.1 client for the gateway's hop to its engines: keep-alive connections on asyncio Protocols.

Why not aiohttp's ClientSession, which the rest of Nebula uses: this hop carries every inference request,
and a general client's per-request machinery (URL objects, header multidicts, request and response
objects with their signals, timers and stream readers) was most of what separated the gateway's CPU per
request from a bare proxy's (issue 3). This client does what the hop needs and no more: POST a body of
known length, read the head, hand the body on as it arrives, reuse the connection.

  - One write per request (head and body together); the response parser is llhttp's (http1_parser).
  - Connections are kept per endpoint and reused most-recent first; a reused connection that the engine
    closed while it sat idle (uvicorn closes idle ones after 5 s) is retried once on a new connection,
    since the engine never saw the request.
  - Reading is paused while the consumer falls behind (upstream_response.py: a slow client).
  - A deadline per request bounds the whole exchange, head and body: `timeout_s` (deadlines.py: one timer
    for all of them).

Failures come as types, the retry intent in the type: UpstreamUnreachable (no connection: the engine saw
nothing), UpstreamDisconnected (the connection broke or spoke nonsense after the request was sent) and
TimeoutError.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import urlsplit

from nebula.adapters.deadlines import Deadlines
from nebula.adapters.http1_parser import ProtocolError, ResponseParser
from nebula.adapters.timeouts import timeout
from nebula.adapters.upstream_response import UpstreamResponse

MAX_IDLE_PER_ENDPOINT: Final = 256


class UpstreamError(Exception):
    """The engine could not give an answer."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made (refused, unreachable, or the connect timed out): the engine saw nothing."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed or broke, or the engine sent bytes that are not HTTP, after the request was sent."""


_Key = tuple[str, int]


def _target(endpoint: str) -> tuple[_Key, str]:
    """(host, port) and the Host header of an `http://host:port` endpoint."""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"engine endpoint {endpoint!r} is not an http://host:port URL")
    return (parts.hostname, parts.port or 80), parts.netloc


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        # One parser for the connection's life, pointed at each response in turn (send).
        self.parser = ResponseParser()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not derive from asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        try:
            self.parser.feed(data)
        except ProtocolError as e:
            response.fail(UpstreamDisconnected(f"invalid response: {e}"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        response = self.response
        if response is None or response.complete:
            return
        try:
            self.parser.feed_eof()
        except ProtocolError:
            reason = f"connection lost: {exc!r}" if exc else "the engine closed the connection"
            response.fail(UpstreamDisconnected(reason))

    def send(self, response: UpstreamResponse, data: bytes) -> None:
        assert self.transport is not None
        self.response = response
        self.parser.reset(response)
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def finished(self, response: UpstreamResponse, reusable: bool) -> None:
        if response is not self.response:
            return
        self.response = None
        if reusable and not self.closed:
            self._pool.put_back(self)
        else:
            self.abort()

    def time_out(self) -> None:
        if self.response is not None:
            self.response.fail(TimeoutError("the engine did not answer within the request timeout"))
        self.abort()


class UpstreamPool:
    """Keep-alive connections to engines, per endpoint. Belongs to one running event loop."""

    def __init__(self, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[_Key, list[_Connection]] = {}
        self._targets: dict[str, tuple[_Key, str]] = {}
        self._closed = False
        # The loop (kept: on Python 3.11 each get_running_loop() is a getpid() system call) and every
        # response's timeout on one of its timers; made on first use, as the pool is built before its loop runs.
        self._running: tuple[asyncio.AbstractEventLoop, Deadlines] | None = None

    def idle_count(self, endpoint: str) -> int:
        return len(self._idle.get(_target(endpoint)[0], ()))

    async def post(self, endpoint: str, path: str, headers: Mapping[str, str], body: bytes,
                   timeout_s: float, method: str = "POST") -> UpstreamResponse:
        """POST `body` to `endpoint` + `path` and return once the response head is in; `method`: another
        method with a body of its own (GET with an empty one, as Content-Length: 0).

        `headers` must not carry Host, Content-Length or Transfer-Encoding (this client sets the framing).
        Raises UpstreamUnreachable, UpstreamDisconnected or TimeoutError (after `timeout_s`, which also
        bounds reading the body).
        """
        if self._closed:
            raise UpstreamUnreachable("the gateway is shutting down")
        target = self._targets.get(endpoint)
        if target is None:
            target = self._targets[endpoint] = _target(endpoint)
        key, host = target
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        if lines.count("\n") != len(headers):
            raise ValueError("a header name or value holds a line break")
        data = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{lines}\r\n"
                .encode("utf-8", "surrogateescape") + body)
        running = self._running
        if running is None:
            loop = asyncio.get_running_loop()
            running = self._running = (loop, Deadlines(loop))
        loop, deadlines = running
        deadline = loop.time() + timeout_s
        while True:
            conn = self._take_idle(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop, key)
            response = UpstreamResponse(loop, conn)
            response.set_deadline(deadlines, deadline, conn.time_out)
            conn.send(response, data)
            try:
                await response.wait_head()
            except UpstreamDisconnected:
                response.release()
                if reused and not conn.parser.started:
                    continue  # closed while idle; the engine never read the request
                raise
            except BaseException:
                response.release()  # timed out or cancelled: the engine learns by the close
                raise
            return response

    def _take_idle(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, key: _Key) -> _Connection:
        try:
            async with timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise UpstreamUnreachable(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as e:
            raise UpstreamUnreachable(f"cannot connect to {key[0]}:{key[1]}: {e}") from e
        return conn

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.abort()
        else:
            idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.get(conn.key, []).remove(conn)

    def close(self) -> None:
        """Close the idle connections; those in use close when their response is released."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
