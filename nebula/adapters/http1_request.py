"""Parsing an HTTP/1.1 request head (RFC 9112): the request line, the header fields, and how the body is
framed. For the gateway's data-plane server (services/http/fastserver.py) and its tests.

The parsing itself is llhttp's (Node's parser, in C, through `httptools`, as uvicorn uses it): it has been
hardened against request smuggling for years. Once llhttp has accepted a head, its fields are read from the
decoded lines in one loop rather than handed over by a Python callback each: a typical 10-field head costs
6.4 us with every check here, where the callbacks alone took 3.5 us of the 7.9 (scripts/bench_parsers.py).
Around llhttp, this module keeps the refusals it leaves to its caller: the size limits (checked before any
parsing), control characters in field values, versions other than 1.0 and 1.1 (505), transfer codings other
than chunked (501), and chunked framing from HTTP/1.0.

Any input gives a RequestHead or a BadRequest, never another exception (a property test feeds it arbitrary
bytes). It is strict where leniency lets two parsers read one request two ways (request smuggling): a header
line with whitespace before its colon, folded lines, a Content-Length that is not a plain number or is
repeated, and a request with both Content-Length and Transfer-Encoding are refused.
"""

from __future__ import annotations

import contextlib
from typing import Final, NamedTuple

import httptools

MAX_HEAD: Final = 64 * 1024  # request line and header fields together
MAX_FIELDS: Final = 128
# Never in a head outside line ends (RFC 9110 5.5: a field value is visible octets, SP, HTAB and obs-text). A
# NUL or an escape sequence in a value would go on to the engine and into logs; CR and LF are checked apart.
_HEAD_CONTROLS: Final = bytes(c for c in range(0x20) if c not in b"\t\r\n") + b"\x7f"
_END: Final = b"\r\n\r\n"
# The fields that say how a request is framed or handled; the others are only passed on.
_FRAMING: Final = frozenset({"content-length", "transfer-encoding", "connection", "expect", "upgrade"})
# Their lengths: a field whose name has another length is passed on without lowering its name (most of a
# typical head; lower() keeps a latin-1 name's length).
_FRAMING_LENGTHS: Final = frozenset(len(name) for name in _FRAMING)


class BadRequest(Exception):
    """The client's bytes are not a request this server will read; `status` is the answer (400, 431,
    501, 505), after which the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestHead(NamedTuple):
    """A parsed head; a NamedTuple (immutable as a frozen dataclass, which took 1.06 us to build per request
    against 0.43 us: a frozen dataclass sets each of its ten fields through object.__setattr__)."""

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


class _Complete:
    """llhttp's one callback on the fast path: that the head ended (the fields are read from the lines)."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


class _Fields(_Complete):
    """For a refused head only: the fields llhttp read before it stopped, to quote the line it stopped at."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def parse_request_head(raw: bytes) -> RequestHead:
    """The head in `raw` (up to, not including, the blank line that ends it). Raises BadRequest.

    llhttp decides whether the head is well formed; once it has accepted it, each line after the request
    line is `name: value` with nothing folded or doubtful, so the fields are read from the lines (one decode
    of the head), not handed over one Python callback each: 2.6 us a typical head where the callbacks took
    6.4 us."""
    if len(raw) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    if raw.count(b"\n") > MAX_FIELDS:
        raise BadRequest(431, "too many header fields")
    if _END in raw:
        raise _bad("an empty line inside the request head")
    if len(raw.translate(None, _HEAD_CONTROLS)) != len(raw):
        raise _bad("control characters in the request head")
    lines = raw.decode("latin-1").split("\r\n")
    method, target, version = _request_line(lines[0])
    got = _Complete()
    try:
        httptools.HttpRequestParser(got).feed_data(raw + _END)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops at an Upgrade's head; the head was read (and the request goes to aiohttp)
    except httptools.HttpParserError as e:
        raise _refusal(e, raw, lines) from None
    if not got.complete:
        raise _bad(f"malformed request head {lines[0][:80]!r}")
    return _head(method, target, version == "HTTP/1.1", lines)


def _request_line(line: str) -> tuple[str, str, str]:
    """Method, target and version, refusing what llhttp lets through or answers 400 where the answer is
    another: a request line without three parts (llhttp reads `GET /` as HTTP/0.9, and takes runs of
    spaces), and a version it does not serve."""
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("HTTP/"):
        raise _bad(f"bad request line {line[:80].encode('latin-1')!r}")
    version = parts[2]
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505, f"HTTP version {version[5:15]!r} is not supported")
    return parts[0], parts[1], version


def _refusal(e: httptools.HttpParserError, raw: bytes, lines: list[str]) -> BadRequest:
    """The answer to a head llhttp refused, quoting the line it stopped at (briefly: it goes to the client).
    The head is read again with a callback per field, to learn how far llhttp got."""
    got = _Fields()
    with contextlib.suppress(httptools.HttpParserError):
        httptools.HttpRequestParser(got).feed_data(raw + _END)
    where = 0 if isinstance(e, (httptools.HttpParserInvalidMethodError, httptools.HttpParserInvalidURLError)) \
        else min(len(got.fields) + 1, len(lines) - 1)
    line = lines[where].encode("latin-1")
    # llhttp refuses a coding other than chunked as a malformed head (before its field reaches on_header when
    # the value is the fault): it is a coding this server does not do.
    for name, value in [*got.fields, line.partition(b":")[::2]]:
        if name.lower() == b"transfer-encoding" and value.strip(b" \t").lower() != b"chunked":
            return BadRequest(501, f"unsupported Transfer-Encoding {value[:40].decode('latin-1')!r}")
    # llhttp's reason ("Invalid header token", "Duplicate Content-Length", ...), without httptools' prefix.
    reason = str(e).rpartition(":")[2].strip() or type(e).__name__
    return _bad(f"malformed request head ({reason}) at {line[:80]!r}")


def _head(method: str, target: str, http11: bool, lines: list[str]) -> RequestHead:
    headers: list[tuple[str, str]] = []
    length = 0
    chunked = has_te = False
    connection: set[str] = set()
    expect_continue = False
    unusual = not target.startswith("/")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        if len(name) not in _FRAMING_LENGTHS:
            continue
        low = name.lower()
        if low not in _FRAMING:
            continue
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
        else:  # upgrade
            unusual = True
    if has_te and not http11:
        raise _bad("HTTP/1.0 has no chunked transfer coding")
    keep_alive = "close" not in connection and (http11 or "keep-alive" in connection)
    return RequestHead(method=method, target=target, path=target.partition("?")[0], http11=http11,
                       headers=tuple(headers), content_length=length, chunked=chunked, keep_alive=keep_alive,
                       expect_continue=expect_continue and http11, unusual=unusual)
