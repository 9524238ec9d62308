"""An incremental HTTP/1.1 response parser: bytes in, head and body pieces out (RFC 9112).

Pure and push-driven, so the connection feeds it whatever each socket read brings and the tests can
feed it every possible split of a response. It implements what a client of an inference engine meets:
a status line and headers, then a body framed by Content-Length, by chunked transfer coding, or by the
connection's close; interim 1xx heads are skipped. Chunk extensions and trailers are read and dropped.

The body's framing is parsed, never its content: a server-sent event stream passes as opaque bytes.
Any input gives a response or ProtocolError, never another exception (a property test feeds it arbitrary
bytes, whole and split), since the client takes ProtocolError for a failed attempt and anything else for a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_HEAD = 64 * 1024  # status line and headers together; an engine's are a few hundred bytes
MAX_CHUNK_LINE = 4 * 1024  # a chunk-size line, extensions included
_NO_BODY = frozenset({204, 304})
_HEX = b"0123456789abcdefABCDEF"
# Never in a head outside line ends (RFC 9110 5.5): header values go on to the client, and into logs.
_HEAD_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\r\n") + b"\x7f"


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 response (the connection cannot be trusted any more)."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    # In the order sent, names as sent; values decoded as latin-1 (RFC 9110 5.5: octets, not text).
    headers: tuple[tuple[str, str], ...]
    # The body's length when the server declared it, None for chunked or close-delimited bodies.
    content_length: int | None
    # False when the server will close the connection after this response (or must, being HTTP/1.0).
    keep_alive: bool


class ResponseSink(Protocol):
    def on_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...


class _NoResponseExpected:
    """The sink of a parser that has not been given a response to parse (see ResponseParser.reset)."""

    def _refuse(self) -> None:
        raise ProtocolError("bytes arrived while no response was expected")

    def on_head(self, head: ResponseHead) -> None:
        self._refuse()

    def on_body(self, data: bytes) -> None:
        self._refuse()

    def on_complete(self) -> None:
        self._refuse()


def _line_end(buf: bytes, pos: int, limit: int, what: str) -> int:
    """Where the line starting at `pos` ends (its CR), or -1 while it is incomplete and within `limit`."""
    end = buf.find(b"\r\n", pos)
    if end < 0 and len(buf) - pos > limit:
        raise ProtocolError(f"{what} too long")
    return end


# Parser states.
_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Parses one response per `reset(sink)` (a connection keeps one parser for all its responses); `feed`
    pushes the response's parts to the sink as soon as they are known.

    After on_complete, bytes fed before a reset raise ProtocolError: an engine never sends unasked bytes,
    and a connection that does is not reused.
    """

    __slots__ = ("_buf", "_remaining", "_sink", "_state")

    def __init__(self, sink: ResponseSink | None = None) -> None:
        self._sink: ResponseSink = sink or _NoResponseExpected()
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0

    def reset(self, sink: ResponseSink) -> None:
        self._sink = sink
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def started(self) -> bool:
        """Whether any byte of the response was seen."""
        return self._state != _HEAD or bool(self._buf)

    def feed_eof(self) -> None:
        """The server closed the connection: the end of a close-delimited body, else a truncated response."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._sink.on_complete()
        elif self._state != _DONE:
            raise ProtocolError("connection closed before the response was complete")

    def feed(self, data: bytes) -> None:
        state = self._state
        # The common cases first: a body piece of a fixed-length or close-delimited response.
        if state == _FIXED and not self._buf and len(data) < self._remaining:
            self._remaining -= len(data)
            self._sink.on_body(data)
            return
        if state == _UNTIL_CLOSE:
            self._sink.on_body(data)
            return
        if state == _CHUNK_SIZE and not self._buf:
            # One whole chunk per read, as a token stream mostly comes: one find, one slice.
            end = data.find(b"\r\n")
            if 0 < end <= 16 and not data[:end].strip(_HEX):
                stop = end + 2 + int(data[:end], 16)
                if stop > end + 2 and len(data) == stop + 2 and data.endswith(b"\r\n"):
                    self._sink.on_body(data[end + 2:stop])
                    return
        buf = self._buf + data if self._buf else data
        self._buf = b""
        while state == _HEAD:  # a loop, not recursion: any number of interim heads may come in one read
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("response head too large")
                self._buf = buf
                return
            self._head(buf[:end])  # sets the body's state (_HEAD again after an interim head)
            buf = buf[end + 4:]
            state = self._state
            if not buf:
                return
            if state == _UNTIL_CLOSE:
                self._sink.on_body(buf)
                return
        if state == _FIXED:
            n = self._remaining
            if len(buf) > n:
                raise ProtocolError("bytes after the end of the response")
            self._remaining -= len(buf)
            self._sink.on_body(buf)
            if not self._remaining:
                self._finish()
        elif state == _DONE:
            raise ProtocolError("bytes after the end of the response")
        else:
            self._chunked(buf)

    def _chunked(self, buf: bytes) -> None:
        """Decode chunked framing in `buf`, passing the data of all the chunks it holds on as one piece."""
        pieces: list[bytes] = []
        pos, n = 0, len(buf)
        state, remaining = self._state, self._remaining
        while pos < n:
            if state == _CHUNK_DATA:
                take = min(remaining, n - pos)
                pieces.append(buf[pos:pos + take])
                pos += take
                remaining -= take
                if not remaining:
                    state = _CHUNK_END
            elif state == _CHUNK_END:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = _line_end(buf, pos, MAX_CHUNK_LINE, "chunk size line")
                if end < 0:
                    break
                size = buf[pos:end].partition(b";")[0].strip()
                if not size or size.strip(_HEX) or len(size) > 16:
                    raise ProtocolError(f"bad chunk size {size[:20]!r}")
                pos = end + 2
                remaining = int(size, 16)
                state = _CHUNK_DATA if remaining else _TRAILERS
            elif state == _TRAILERS:
                end = _line_end(buf, pos, MAX_HEAD, "trailer line")
                if end < 0:
                    break
                last = end == pos
                pos = end + 2
                if last:
                    state = _DONE
                    break
            else:
                break
        self._state, self._remaining = state, remaining
        self._buf = buf[pos:] if pos < n else b""
        if pieces:
            self._sink.on_body(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if state == _DONE:
            self._finish()

    def _finish(self) -> None:
        self._state = _DONE
        self._sink.on_complete()
        if self._buf:
            raise ProtocolError("bytes after the end of the response")

    def _head(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        if raw.count(b"\n") != len(lines) - 1 or raw.count(b"\r") != len(lines) - 1:
            # Header values go on to the client: a bare CR or LF in one would split it there.
            raise ProtocolError("bare CR or LF in the response head")
        if len(raw.translate(None, _HEAD_CONTROLS)) != len(raw):
            raise ProtocolError("control characters in the response head")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name_s, value_s = name.decode("latin-1"), value.strip().decode("latin-1")
            headers.append((name_s, value_s))
            low = name_s.lower()
            if low == "content-length":
                # ASCII digits only and at most 18 of them: str.isdigit() takes '²', which int() refuses, and
                # int() refuses over 4300 digits; both would be a ValueError, not a ProtocolError.
                if (not value_s.isdigit() or not value_s.isascii() or len(value_s) > 18
                        or (length is not None and length != int(value_s))):
                    raise ProtocolError(f"bad Content-Length {value_s[:40]!r}")
                length = int(value_s)
            elif low == "transfer-encoding":
                codings = [c.strip().lower() for c in value_s.split(",")]
                if codings[-1] != "chunked":
                    raise ProtocolError(f"unsupported Transfer-Encoding {value_s[:40]!r}")
                chunked = True
            elif low == "connection":
                tokens = {t.strip().lower() for t in value_s.split(",")}
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real head follows
        if chunked:
            # RFC 9112 6.3: chunked wins over a Content-Length, which must then not be trusted.
            length = None
        until_close = not chunked and length is None and status not in _NO_BODY
        if until_close:
            keep_alive = False  # the body ends only when the connection does
        head = ResponseHead(status, reason.decode("latin-1"), tuple(headers), length, keep_alive)
        self._sink.on_head(head)
        if status in _NO_BODY or (length == 0 and not chunked):
            self._state = _DONE
            self._sink.on_complete()
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state = _FIXED
            self._remaining = length
        else:
            self._state = _UNTIL_CLOSE
