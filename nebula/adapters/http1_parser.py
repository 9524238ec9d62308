"""An incremental HTTP/1.1 response parser: bytes in, head and body pieces out (RFC 9112).

The parsing is llhttp's (Node's parser, in C, through `httptools`); this module gives it the shape the engine
hop needs. Push-driven, so the connection feeds it whatever each socket read brings and the tests can feed it
every possible split of a response. A body is framed by Content-Length, by chunked transfer coding, or by
the connection's close; interim 1xx heads are skipped; chunk extensions and trailers are dropped.

A read's body reaches the sink as one piece however many chunks it held, so a burst of events read off the
socket together goes on as one write. In passthrough mode (`passthrough()`, for a relay whose client speaks
HTTP/1.1) the parser still checks the framing and finds the end, but the sink gets each read's bytes as they
came, chunked framing included, to be forwarded unchanged; llhttp still calls on_body once per chunk (a list
append), the only Python work per chunk. Per read of an SSE token stream (scripts/bench_parsers.py): one chunk
0.34 us, four chunks 0.57 us.

The body's framing is parsed, never its content: a server-sent event stream passes as opaque bytes.
Any input gives a response or ProtocolError, never another exception (a property test feeds it arbitrary
bytes, whole and split), since the client takes ProtocolError for a failed attempt and anything else for a bug.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol

import httptools

MAX_HEAD: Final = 64 * 1024  # status line and headers together; an engine's are a few hundred bytes
_NO_BODY: Final = frozenset({204, 304})
# Never in a head outside line ends (RFC 9110 5.5): header values go on to the client, and into logs.
_HEAD_CONTROLS: Final = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 response (the connection cannot be trusted any more)."""


class _Refused(Exception):
    """Raised inside an llhttp callback; feed() turns it into ProtocolError with the reason kept here."""


class ResponseHead(NamedTuple):
    """A parsed head; a NamedTuple, as the request's (http1_request.RequestHead): built once per response."""

    status: int
    reason: str
    # In the order sent, names as sent; values decoded as latin-1 (RFC 9110 5.5: octets, not text).
    headers: tuple[tuple[str, str], ...]
    # The body's length when the server declared it, None for chunked or close-delimited bodies.
    content_length: int | None
    # False when the server will close the connection after this response (or must, being HTTP/1.0).
    keep_alive: bool
    chunked: bool = False


class ResponseSink(Protocol):
    def on_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...


_UNASKED: Final = "bytes arrived while no response was expected"

# Parser states.
_HEAD: Final = 0
_BODY: Final = 1
_UNTIL_CLOSE: Final = 2
_DONE: Final = 3


class ResponseParser:
    """Parses one response per `reset(sink)` (a connection keeps one for all its responses); `feed` pushes the
    response's parts to the sink as soon as they are known, after llhttp has checked the whole read.

    After the end of a response, bytes fed before a reset raise ProtocolError: an engine never sends unasked
    bytes, and a connection that does is not reused.
    """

    __slots__ = ("_complete", "_fields", "_head", "_head_seen", "_interim", "_kept_alive", "_llhttp", "_passthrough",
                 "_pieces", "_reason", "_refusal", "_sink", "_started", "_state")

    def __init__(self, sink: ResponseSink | None = None) -> None:
        self._sink = sink
        self._state = _HEAD
        self._kept_alive = False  # the last head let the connection go on (llhttp's own flag is reset by then)
        self._begin()

    def reset(self, sink: ResponseSink) -> None:
        self._sink = sink
        self._begin()

    def _begin(self) -> None:
        # After a whole keep-alive response llhttp waits for the next message, so its parser is kept: a new one
        # and its leniency cost 0.4 us a response. After anything else (a first response, one cut short, a
        # failure) a new one starts clean.
        if self._state != _DONE or not self._kept_alive:
            self._llhttp = httptools.HttpResponseParser(self)
            # RFC 9112 6.3: chunked wins over a Content-Length, which is then not trusted (llhttp would refuse it).
            self._llhttp.set_dangerous_leniencies(lenient_chunked_length=True)
        self._state = _HEAD
        self._started = self._complete = self._interim = self._passthrough = False
        self._head: ResponseHead | None = None
        self._head_seen = 0  # bytes fed while the head was incomplete
        self._fields: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._pieces: list[bytes] = []
        self._refusal = ""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def started(self) -> bool:
        """Whether any byte of the response was seen."""
        return self._started

    def passthrough(self) -> None:
        """From the next read on, hand the sink each read's bytes as they came (framing included)."""
        self._passthrough = True

    def feed_eof(self) -> None:
        """The server closed the connection: the end of a close-delimited body, else a truncated response."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._sink_or_refuse().on_complete()
        elif self._state != _DONE:
            raise ProtocolError("connection closed before the response was complete")

    def feed(self, data: bytes) -> None:
        if not data:
            return
        sink = self._sink
        if sink is None:  # _sink_or_refuse, inline: feed runs once per read of a stream
            raise ProtocolError(_UNASKED)
        self._started = True
        state = self._state
        if state == _UNTIL_CLOSE:
            sink.on_body(data)
            return
        if state == _DONE:
            raise ProtocolError("bytes after the end of the response")
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ProtocolError("a protocol switch the engine hop does not ask for") from None
        except httptools.HttpParserError as e:
            raise ProtocolError(self._refusal or str(e).rpartition(":")[2].strip() or type(e).__name__) from None
        if self._state == _HEAD:
            self._head_seen += len(data)
            if self._head_seen > MAX_HEAD:
                raise ProtocolError("response head too large")
        head, self._head = self._head, None
        if head is not None:
            sink.on_head(head)
        if state == _BODY and self._passthrough:
            self._pieces.clear()
            sink.on_body(data)
        elif self._pieces:
            pieces = self._pieces
            sink.on_body(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            pieces.clear()
        if self._complete:
            self._complete = False
            sink.on_complete()

    def _sink_or_refuse(self) -> ResponseSink:
        if self._sink is None:
            raise ProtocolError(_UNASKED)
        return self._sink

    def _refuse(self, reason: str) -> _Refused:
        self._refusal = reason
        return _Refused(reason)

    # -- llhttp's callbacks (called from inside feed_data) --

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            raise self._refuse("bytes after the end of the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._llhttp.get_status_code()
        fields, reason = self._fields, self._reason
        self._fields, self._reason = [], b""
        if 100 <= status < 200:
            self._interim = True  # an interim answer (100 Continue, 103 Early Hints): the real head follows
            return
        if len(reason.translate(None, _HEAD_CONTROLS)) != len(reason):
            raise self._refuse("control characters in the response head")
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        for name_b, value_b in fields:
            name, value = name_b.decode("latin-1"), value_b.strip(b" \t").decode("latin-1")
            headers.append((name, value))
            low = name.lower()
            if low == "content-length":
                if len(value) > 18:  # llhttp read the digits; an 18-digit body is already absurd
                    raise self._refuse(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif low == "transfer-encoding":
                if value.rpartition(",")[2].strip().lower() != "chunked":
                    raise self._refuse(f"unsupported Transfer-Encoding {value[:40]!r}")
                chunked = True
        if chunked:
            length = None
        keep_alive = self._llhttp.should_keep_alive()
        until_close = not chunked and length is None and status not in _NO_BODY
        self._kept_alive = keep_alive and not until_close
        self._head = ResponseHead(status, reason.decode("latin-1"), tuple(headers), length, self._kept_alive, chunked)
        self._state = _UNTIL_CLOSE if until_close else _BODY

    def on_body(self, data: bytes) -> None:
        self._pieces.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._state == _UNTIL_CLOSE:
            return  # llhttp has no end for it but the connection's: feed_eof
        self._state = _DONE
        self._complete = True
