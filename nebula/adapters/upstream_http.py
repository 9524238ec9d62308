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
  - Reading is paused while more than READ_HIGH bytes of body wait for the consumer (a slow client).
  - One timer per request bounds the whole exchange, head and body: `timeout_s`.

Failures come as types, the retry intent in the type: UpstreamUnreachable (no connection: the engine saw
nothing), UpstreamDisconnected (the connection broke or spoke nonsense after the request was sent) and
TimeoutError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

from nebula.adapters.http1_parser import ProtocolError, ResponseHead, ResponseParser

READ_HIGH = 256 * 1024
MAX_IDLE_PER_ENDPOINT = 256


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


class UpstreamResponse:
    """An engine's answer: the head is known, the body arrives through read()/read_chunk().

    Use it as an async context manager (or call release()): a response read to its end gives its
    connection back for reuse, any other closes it, which is how an engine learns that a request was
    abandoned.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_exc",
        "_loop",
        "_paused",
        "_released",
        "_timer",
        "_waiter",
        "chunked",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: _Connection) -> None:
        self._loop = loop
        self._conn = conn
        self.status = 0
        self.reason = ""
        self.headers: tuple[tuple[str, str], ...] = ()
        self.content_length: int | None = None
        self.keep_alive = False
        self.chunked = False  # the body comes in chunked framing (a stream, from vLLM)
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._released = False

    # -- fed by the connection (ResponseSink) --

    def on_head(self, head: ResponseHead) -> None:
        self.status, self.reason, self.headers = head.status, head.reason, head.headers
        self.content_length, self.keep_alive, self.chunked = head.content_length, head.keep_alive, head.chunked
        self._wake()

    def on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def on_complete(self) -> None:
        self.complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter

    # -- used by the caller --

    async def wait_head(self) -> None:
        while not self.status:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read_chunk(self) -> bytes:
        """The body that arrived since the last call (framing removed), waiting for some; b"" at its end.

        Everything buffered comes at once, so a burst of events read off the socket together goes on to
        the client in one write.
        """
        chunks = self._chunks
        while not chunks:
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return data

    def passthrough(self) -> tuple[bytes, bool]:
        """Switch a chunked body to passthrough: what read_chunk returns from now on is the engine's bytes as
        they came, chunked framing and the final zero-size chunk included (for a client that speaks HTTP/1.1,
        to forward unchanged). Returns the body already read off the socket (framing removed) and whether the
        switch happened: not when the body had ended already, whose end is then the caller's to frame."""
        if not self.complete:
            self._conn.parser.passthrough()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data, not self.complete

    async def read(self) -> bytes:
        """The whole body (what is left of it)."""
        while not self.complete:
            if self._exc is not None:
                raise self._exc
            await self._wait()
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.finished(self, reusable=self.complete and self.keep_alive and self._exc is None)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            conn = self._take_idle(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop, key)
            response = UpstreamResponse(loop, conn)
            response._timer = loop.call_at(deadline, conn.time_out)
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
            async with asyncio.timeout(self._connect_timeout_s):
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
