"""The answer side of a data-plane connection (fastserver.py): a Reply (reply.py) written on a FastConnection,
in one write for a whole answer, chunked for a stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from nebula.services.http.errors import ApiError

if TYPE_CHECKING:
    from nebula.services.http.fastconnection import FastConnection

_PHRASES: Final = {s.value: s.phrase for s in HTTPStatus}


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
        if self._conn.last_answer:
            self.keep_alive = False  # shutdown began since the request came: say this answer is the last
        if self.extra_headers:
            headers = [*headers, *self.extra_headers]
        return _head_bytes(status, reason, headers, self._conn.date(), framing, self.keep_alive)

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

    @property
    def will_chunk(self) -> bool:
        """Whether a streamed body goes out chunked (to an HTTP/1.1 client), so that an engine's chunked body
        can be forwarded as it came (write_chunked, end_chunked)."""
        return self._http11

    async def write_chunked(self, framed: bytes) -> None:
        """Bytes already in chunked framing (an engine's, checked by the parser), forwarded as they are."""
        if self._pending:
            framed, self._pending = self._pending + framed, b""
        await self._conn.send(framed)

    def chunk_writer(self) -> Callable[[bytes], bool]:
        """write_chunked for a callback (UpstreamResponse.forward), called once per read of a stream: each call
        writes at once, and returns False when the client is not reading fast enough, to wait for `drained`
        before more. The connection's own method, so that a relayed read costs no call in between."""
        return self._conn.write_now

    async def drained(self) -> None:
        await self._conn.drained()

    def end_chunked(self) -> None:
        """The body is complete: its last chunk, the engine's own, went through write_chunked or
        chunk_writer, after the head (which the first write carried)."""
        self.done = True

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
