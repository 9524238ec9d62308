"""Parsing an HTTP/1.1 request head (RFC 9112): the request line, the header fields, and how the body is
framed. For the gateway's data-plane server (services/http/fastserver.py) and its tests.

The parsing itself is llhttp's (Node's parser, in C, through `httptools`, as uvicorn uses it): it has been
hardened against request smuggling for years, and it reads a typical 10-field head in about 1.6 us where the
hand-written Python parser it replaced took 8.9 us. Around it, this module keeps the refusals llhttp leaves to
its caller: the size limits (checked before any parsing), control characters in field values, versions other
than 1.0 and 1.1 (505), transfer codings other than chunked (501), and chunked framing from HTTP/1.0.

Any input gives a RequestHead or a BadRequest, never another exception (a property test feeds it arbitrary
bytes). It is strict where leniency lets two parsers read one request two ways (request smuggling): a header
line with whitespace before its colon, folded lines, a Content-Length that is not a plain number or is
repeated, and a request with both Content-Length and Transfer-Encoding are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

MAX_HEAD = 64 * 1024  # request line and header fields together
MAX_FIELDS = 128
# Never in a head outside line ends (RFC 9110 5.5: a field value is visible octets, SP, HTAB and obs-text). A
# NUL or an escape sequence in a value would go on to the engine and into logs; CR and LF are checked apart.
_HEAD_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\r\n") + b"\x7f"
_END = b"\r\n\r\n"


class BadRequest(Exception):
    """The client's bytes are not a request this server will read; `status` is the answer (400, 431,
    501, 505), after which the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # as sent: the path with its query, for origin-form requests
    path: str  # the target up to its '?'
    http11: bool  # False for HTTP/1.0
    # In the order sent, names as sent, values decoded as latin-1 (RFC 9110 5.5: octets, not text).
    headers: tuple[tuple[str, str], ...]
    content_length: int  # 0 when the request has no Content-Length (and is not chunked)
    chunked: bool
    # False when the client asked the connection to close after this request (or is HTTP/1.0 and did
    # not ask to keep it).
    keep_alive: bool
    # The client waits for "100 Continue" before it sends the body.
    expect_continue: bool
    # The head has something only a general server handles: an Upgrade, an expectation other than
    # 100-continue, or a target that is not origin-form.
    unusual: bool


def _bad(message: str) -> BadRequest:
    return BadRequest(400, message)


class _Collector:
    """What llhttp's callbacks hand over: the target and the fields, in the order sent."""

    __slots__ = ("complete", "fields", "target")

    def __init__(self) -> None:
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(raw: bytes) -> RequestHead:
    """The head in `raw` (up to, not including, the blank line that ends it). Raises BadRequest."""
    if len(raw) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    if raw.count(b"\n") > MAX_FIELDS:
        raise BadRequest(431, "too many header fields")
    if _END in raw:
        raise _bad("an empty line inside the request head")
    if len(raw.translate(None, _HEAD_CONTROLS)) != len(raw):
        raise _bad("control characters in the request head")
    lines = raw.split(b"\r\n")
    _check_request_line(lines[0])
    got = _Collector()
    parser = httptools.HttpRequestParser(got)
    try:
        parser.feed_data(raw + _END)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops at an Upgrade's head; the head was read (and the request goes to aiohttp)
    except httptools.HttpParserError as e:
        raise _refusal(e, got, lines) from None
    if not got.complete:
        raise _bad(f"malformed request head {lines[0][:80]!r}")
    return _head(parser, got)


def _check_request_line(line: bytes) -> None:
    """What llhttp lets through or answers 400 where the answer is another: a request line without three
    parts (llhttp reads `GET /` as HTTP/0.9, and takes runs of spaces), and a version it does not serve."""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith(b"HTTP/"):
        raise _bad(f"bad request line {line[:80]!r}")
    version = parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505, f"HTTP version {version[5:15].decode('latin-1')!r} is not supported")


def _refusal(e: httptools.HttpParserError, got: _Collector, lines: list[bytes]) -> BadRequest:
    """The answer to a head llhttp refused, quoting the line it stopped at (briefly: it goes to the client)."""
    where = 0 if isinstance(e, (httptools.HttpParserInvalidMethodError, httptools.HttpParserInvalidURLError)) \
        else min(len(got.fields) + 1, len(lines) - 1)
    # llhttp refuses a coding other than chunked as a malformed head (before its field reaches on_header when
    # the value is the fault): it is a coding this server does not do.
    for name, value in [*got.fields, lines[where].partition(b":")[::2]]:
        if name.lower() == b"transfer-encoding" and value.strip(b" \t").lower() != b"chunked":
            return BadRequest(501, f"unsupported Transfer-Encoding {value[:40].decode('latin-1')!r}")
    # llhttp's reason ("Invalid header token", "Duplicate Content-Length", ...), without httptools' prefix.
    reason = str(e).rpartition(":")[2].strip() or type(e).__name__
    return _bad(f"malformed request head ({reason}) at {lines[where][:80]!r}")


def _head(parser: httptools.HttpRequestParser, got: _Collector) -> RequestHead:
    http11 = parser.get_http_version() == "1.1"
    headers: list[tuple[str, str]] = []
    length = 0
    chunked = has_te = False
    connection: set[str] = set()
    expect_continue = False
    unusual = not got.target.startswith(b"/")
    for name_b, value_b in got.fields:
        name, value = name_b.decode("latin-1"), value_b.strip(b" \t").decode("latin-1")
        headers.append((name, value))
        low = name.lower()
        if low == "content-length":
            # llhttp read it as a number already and refused a second one; it may not exceed 18 digits here.
            if len(value) > 18:
                raise _bad(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif low == "transfer-encoding":
            has_te = True
            if [c.strip().lower() for c in value.split(",")] != ["chunked"]:
                raise BadRequest(501, f"unsupported Transfer-Encoding {value[:40]!r}")
            chunked = True
        elif low == "connection":
            connection.update(t.strip().lower() for t in value.split(","))
        elif low == "expect":
            if value.lower() == "100-continue":
                expect_continue = True
            else:
                unusual = True
        elif low == "upgrade":
            unusual = True
    if has_te and not http11:
        raise _bad("HTTP/1.0 has no chunked transfer coding")
    keep_alive = "close" not in connection and (http11 or "keep-alive" in connection)
    target = got.target.decode("latin-1")
    return RequestHead(method=parser.get_method().decode("ascii"), target=target, path=target.partition("?")[0],
                       http11=http11, headers=tuple(headers), content_length=length, chunked=chunked,
                       keep_alive=keep_alive, expect_continue=expect_continue and http11, unusual=unusual)
