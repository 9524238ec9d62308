"""Parsing an HTTP/1.1 request head (RFC 9112): the request line, the header fields, and how the body is
framed. Pure, for the gateway's data-plane server (services/http/fastserver.py) and its tests.

Any input gives a RequestHead or a BadRequest, never another exception (a property test feeds it arbitrary
bytes). It is strict where leniency lets two parsers read one request two ways (request smuggling): a header
line with whitespace before its colon, folded lines, a Content-Length that is not a plain number or is
repeated with another value, and a request with both Content-Length and Transfer-Encoding are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # request line and header fields together
MAX_FIELDS = 128
# RFC 9110 5.6.2 token characters: a method and a field name are made of these only.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_CONTROLS = bytes(range(0x21)) + b"\x7f"  # never in a request target (RFC 9112 3.2)
# Never in a head outside line ends (RFC 9110 5.5: a field value is visible octets, SP, HTAB and obs-text). A
# NUL or an escape sequence in a value would go on to the engine and into logs; CR and LF are checked apart.
_HEAD_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\r\n") + b"\x7f"


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


def parse_request_head(raw: bytes) -> RequestHead:
    """The head in `raw` (up to, not including, the blank line that ends it). Raises BadRequest."""
    if len(raw) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    lines = raw.split(b"\r\n")
    if len(lines) > MAX_FIELDS + 1:
        raise BadRequest(431, "too many header fields")
    if raw.count(b"\n") != len(lines) - 1 or raw.count(b"\r") != len(lines) - 1:
        # A bare CR or LF would end a line for some parsers and not others (and the value goes upstream).
        raise _bad("bare CR or LF in the request head")
    if len(raw.translate(None, _HEAD_CONTROLS)) != len(raw):
        raise _bad("control characters in the request head")
    method_b, target_b, version = _request_line(lines[0])
    http11 = version == b"HTTP/1.1"
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    has_te = False
    connection: set[str] = set()
    expect_continue = False
    unusual = not target_b.startswith(b"/")
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise _bad(f"bad header line {line[:80]!r}")
        name_s, value_s = name.decode("latin-1"), value.strip(b" \t").decode("latin-1")
        headers.append((name_s, value_s))
        low = name_s.lower()
        if low == "content-length":
            # At most 18 digits: int() refuses over 4300 (a ValueError, not a refusal), and no body is that big.
            if (not value_s.isdigit() or not value_s.isascii() or len(value_s) > 18
                    or (length is not None and length != int(value_s))):
                raise _bad(f"bad Content-Length {value_s[:40]!r}")
            length = int(value_s)
        elif low == "transfer-encoding":
            has_te = True
            codings = [c.strip().lower() for c in value_s.split(",")]
            if codings != ["chunked"]:
                raise BadRequest(501, f"unsupported Transfer-Encoding {value_s[:40]!r}")
            chunked = True
        elif low == "connection":
            connection.update(t.strip().lower() for t in value_s.split(","))
        elif low == "expect":
            if value_s.lower() == "100-continue":
                expect_continue = True
            else:
                unusual = True
        elif low == "upgrade":
            unusual = True
    if has_te and length is not None:
        raise _bad("a request may not carry both Content-Length and Transfer-Encoding")
    if has_te and not http11:
        raise _bad("HTTP/1.0 has no chunked transfer coding")
    keep_alive = "close" not in connection and (http11 or "keep-alive" in connection)
    target = target_b.decode("latin-1")
    return RequestHead(method=method_b.decode("ascii"), target=target, path=target.partition("?")[0],
                       http11=http11, headers=tuple(headers), content_length=length or 0, chunked=chunked,
                       keep_alive=keep_alive, expect_continue=expect_continue and http11, unusual=unusual)


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _bad(f"bad request line {line[:80]!r}")
    method, target, version = parts
    if not _TOKEN.issuperset(method):
        raise _bad(f"bad method {method[:20]!r}")
    if not version.startswith(b"HTTP/"):
        raise _bad(f"bad request line {line[:80]!r}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505, f"HTTP version {version[5:15].decode('latin-1')!r} is not supported")
    if len(target.translate(None, _CONTROLS)) != len(target):
        raise _bad("control characters in the request target")
    return method, target, version
