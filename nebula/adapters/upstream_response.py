"""An engine's answer as the gateway's engine client (upstream_http.py) reads it: the head, then the body handed
on as it arrives, by read(), read_chunk() or, for a relay that forwards the engine's own framing, forward().

Reading pauses while more than READ_HIGH bytes of body wait for the consumer, or while forward()'s consumer (a
client's connection) cannot take more, so that a slow client holds the engine back instead of the gateway
buffering its stream."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from types import TracebackType
from typing import Final, Protocol

from nebula.adapters.deadlines import Deadlines
from nebula.adapters.http1_parser import ResponseHead, ResponseParser

READ_HIGH: Final = 256 * 1024


class UpstreamLink(Protocol):
    """The connection a response arrives on, as the response uses it."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def finished(self, response: UpstreamResponse, reusable: bool) -> None: ...
    @property
    def parser(self) -> ResponseParser: ...


class UpstreamResponse:
    """An engine's answer: the head is known, the body arrives through read()/read_chunk().

    Use it as an async context manager (or call release()): a response read to its end gives its
    connection back for reuse, any other closes it, which is how an engine learns that a request was
    abandoned.
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_deadlines", "_exc", "_forward", "_loop", "_paused", "_released",
                 "_waiter", "chunked", "complete", "content_length", "headers", "keep_alive", "reason", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: UpstreamLink) -> None:
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
        self._deadlines: Deadlines | None = None  # where its deadline is set, until it is done
        self._released = False
        self._forward: Callable[[bytes], bool] | None = None

    def set_deadline(self, deadlines: Deadlines, at: float, expire: Callable[[], object]) -> None:
        """Call `expire` at loop time `at` unless the response is complete or released by then."""
        self._deadlines = deadlines
        deadlines.set(self, at, expire)

    # -- fed by the connection (ResponseSink) --

    def on_head(self, head: ResponseHead) -> None:
        self.status, self.reason, self.headers = head.status, head.reason, head.headers
        self.content_length, self.keep_alive, self.chunked = head.content_length, head.keep_alive, head.chunked
        self._wake()

    def on_body(self, data: bytes) -> None:
        forward = self._forward
        if forward is not None:
            if not forward(data):  # the client is not keeping up: stop reading until it does
                self._paused = True
                self._conn.pause_reading()
                self._wake()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def on_complete(self) -> None:
        self.complete = True
        if self._forward is not None:
            self.resume_forwarding()  # nothing more to read for this body: the connection may serve the next
        if self._deadlines is not None:
            self._deadlines.drop(self)
            self._deadlines = None
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

    def forward(self, sink: Callable[[bytes], bool]) -> None:
        """Hand each read of the body to `sink` as it arrives, in the event loop's callback, waking no task:
        a relay's per-read cost is then the parser's check and the client's write. What is buffered goes
        first. `sink` returns False when it cannot take more for now: reading pauses, wait_forwarded returns
        False, and resume_forwarding reads on. Meant for passthrough(), whose reads are whole framed pieces."""
        self._forward = sink
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            if not sink(data) and not self._paused:
                self._paused = True
                self._conn.pause_reading()

    async def wait_forwarded(self) -> bool:
        """After forward(): True once the body has ended, False when reading paused for the sink; raises as
        read_chunk does (the engine broke, the request timed out)."""
        while not self.complete:
            if self._exc is not None:
                raise self._exc
            if self._paused:
                return False
            await self._wait()
        return True

    def resume_forwarding(self) -> None:
        if self._paused:
            self._paused = False
            self._conn.resume_reading()

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
        if self._deadlines is not None:
            self._deadlines.drop(self)
            self._deadlines = None
        self._conn.finished(self, reusable=self.complete and self.keep_alive and self._exc is None)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
