"""The data-plane server's request-head parser: what it reads from a well-formed head (framing, keep-alive,
the flags that hand a request to aiohttp), and every refusal with the status the client is answered."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.adapters.http1_request import MAX_FIELDS, MAX_HEAD, BadRequest, RequestHead, parse_request_head


def head(*lines: str) -> bytes:
    """A head as the server passes it: CRLF-separated lines, without the blank line that ends it."""
    return "\r\n".join(lines).encode("latin-1")


def refused(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_request_head(raw)
    return info.value


def test_a_typical_post() -> None:
    h = parse_request_head(head("POST /v1/chat/completions?stream=1 HTTP/1.1", "Host: gw:8080",
                                "Content-Type: application/json", "X-Multi: a", "Content-Length: 42",
                                "x-multi: b"))
    assert h == RequestHead(
        method="POST", target="/v1/chat/completions?stream=1", path="/v1/chat/completions", http11=True,
        # Names keep their case and the headers their order (a repeated one stays two entries).
        headers=(("Host", "gw:8080"), ("Content-Type", "application/json"), ("X-Multi", "a"),
                 ("Content-Length", "42"), ("x-multi", "b")),
        content_length=42, chunked=False, keep_alive=True, expect_continue=False, unusual=False)


def test_values_are_trimmed_and_decoded_as_latin1() -> None:
    # Optional whitespace (spaces and tabs) around a value is not part of it; an empty value is allowed;
    # octets over 0x7f are kept one character each (RFC 9110 5.5 obs-text), not decoded as UTF-8.
    h = parse_request_head(b"GET / HTTP/1.1\r\nA: \t x y \t\r\nB:\r\nC: caf\xc3\xa9")
    assert h.headers == (("A", "x y"), ("B", ""), ("C", "caf\xc3\xa9"))
    assert h.content_length == 0 and not h.chunked and h.path == "/"


def test_only_a_request_line() -> None:
    h = parse_request_head(b"GET /health HTTP/1.1")
    assert (h.method, h.path, h.headers, h.keep_alive) == ("GET", "/health", (), True)


@pytest.mark.parametrize(("version", "connection", "keep_alive"), [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Keep-Alive, CLOSE", False),  # a token list, compared case-insensitively
    ("HTTP/1.1", "upgrade", True),
    ("HTTP/1.0", None, False),  # HTTP/1.0 closes unless asked not to
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
    ("HTTP/1.0", "keep-alive, close", False),
])
def test_keep_alive(version: str, connection: str | None, keep_alive: bool) -> None:
    lines = [f"GET / {version}", "Host: x"] + ([f"Connection: {connection}"] if connection else [])
    h = parse_request_head(head(*lines))
    assert h.keep_alive is keep_alive
    assert h.http11 is (version == "HTTP/1.1")


@pytest.mark.parametrize("value", ["100-continue", "100-Continue", "100-CONTINUE"])
def test_expect_100_continue(value: str) -> None:
    h = parse_request_head(head("POST /x HTTP/1.1", f"Expect: {value}", "Content-Length: 5"))
    assert h.expect_continue and not h.unusual


def test_expect_is_ignored_from_an_http10_client() -> None:
    # HTTP/1.0 has no 100 Continue: such a client sends its body without waiting for one.
    h = parse_request_head(head("POST /x HTTP/1.0", "Expect: 100-continue", "Content-Length: 5"))
    assert not h.expect_continue and not h.unusual


@pytest.mark.parametrize("raw", [
    head("POST /x HTTP/1.1", "Expect: 200-ok", "Content-Length: 1"),
    head("GET /ws HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"),
    head("GET http://gw/x HTTP/1.1"),  # absolute-form: a proxy request
    head("OPTIONS * HTTP/1.1"),  # asterisk-form
], ids=["other-expect", "upgrade", "absolute-form", "asterisk-form"])
def test_unusual_requests_are_flagged_for_aiohttp(raw: bytes) -> None:
    h = parse_request_head(raw)
    assert h.unusual and not h.expect_continue


@pytest.mark.parametrize("te", ["chunked", "Chunked", " chunked "])
def test_chunked(te: str) -> None:
    h = parse_request_head(head("POST /x HTTP/1.1", f"Transfer-Encoding: {te}"))
    assert h.chunked and h.content_length == 0 and not h.unusual


def test_the_field_limit_is_inclusive() -> None:
    h = parse_request_head(head("GET / HTTP/1.1", *[f"H{i}: v" for i in range(MAX_FIELDS)]))
    assert len(h.headers) == MAX_FIELDS


REFUSALS = [
    # The request line.
    ("empty", b"", 400),
    ("no-version", head("GET /"), 400),
    ("only-method", head("GET"), 400),
    ("no-target", head("GET  HTTP/1.1"), 400),
    ("no-method", head(" / HTTP/1.1"), 400),
    ("double-space", head("GET  / HTTP/1.1"), 400),
    ("trailing-space", head("GET / HTTP/1.1 "), 400),
    ("tab-separated", head("GET\t/\tHTTP/1.1"), 400),
    ("space-in-target", head("GET /a b HTTP/1.1"), 400),
    ("bad-method", head("G@T / HTTP/1.1"), 400),
    ("lower-case-version", head("GET / http/1.1"), 400),
    ("garbage-version", head("GET / XYZ"), 400),
    ("http2", head("GET / HTTP/2.0"), 505),
    ("http12", head("GET / HTTP/1.2"), 505),
    ("http09", head("GET / HTTP/0.9"), 505),
    ("version-garbage-after-prefix", head("GET / HTTP/one"), 505),
    ("control-char-in-target", b"GET /a\x01b HTTP/1.1", 400),
    ("nul-in-target", b"GET /a\x00 HTTP/1.1", 400),
    ("del-in-target", b"GET /a\x7f HTTP/1.1", 400),
    # Header lines: what two parsers could read two ways.
    ("space-before-colon", head("POST /x HTTP/1.1", "Content-Length : 5"), 400),
    ("tab-before-colon", head("POST /x HTTP/1.1", "Content-Length\t: 5"), 400),
    ("folded-line", head("GET / HTTP/1.1", "X-A: one", " two"), 400),
    ("folded-line-tab", head("GET / HTTP/1.1", "X-A: one", "\ttwo"), 400),
    ("no-colon", head("GET / HTTP/1.1", "X-A one"), 400),
    ("empty-name", head("GET / HTTP/1.1", ": v"), 400),
    ("bad-char-in-name", head("GET / HTTP/1.1", "X(A): v"), 400),
    ("empty-line-inside", head("GET / HTTP/1.1", "", "X-A: v"), 400),
    ("bare-lf", b"GET / HTTP/1.1\nHost: x", 400),
    ("bare-lf-in-value", b"GET / HTTP/1.1\r\nX-A: a\nb", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\nX-A: a\rb", 400),
    ("bare-cr-at-end", b"GET / HTTP/1.1\r\nX-A: a\r", 400),
    ("lf-cr-line-end", b"GET / HTTP/1.1\n\rX-A: a", 400),
    # Control characters in a value (HTAB is the only one allowed): they go upstream and into logs.
    ("nul-in-value", b"GET / HTTP/1.1\r\nX-A: a\x00b", 400),
    ("escape-in-value", b"GET / HTTP/1.1\r\nX-A: \x1b[31mred", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\nX-A: a\x7f", 400),
    ("vt-in-value", b"GET / HTTP/1.1\r\nX-A: a\x0bb", 400),
    # Body framing.
    ("content-length-text", head("POST /x HTTP/1.1", "Content-Length: five"), 400),
    ("content-length-negative", head("POST /x HTTP/1.1", "Content-Length: -1"), 400),
    ("content-length-plus", head("POST /x HTTP/1.1", "Content-Length: +1"), 400),
    ("content-length-empty", head("POST /x HTTP/1.1", "Content-Length:"), 400),
    ("content-length-list", head("POST /x HTTP/1.1", "Content-Length: 5, 5"), 400),
    ("content-length-hex", head("POST /x HTTP/1.1", "Content-Length: 0x10"), 400),
    ("content-length-inner-space", head("POST /x HTTP/1.1", "Content-Length: 1 0"), 400),
    ("content-length-superscript", b"POST /x HTTP/1.1\r\nContent-Length: \xb2", 400),  # '2'.isdigit() is True
    ("content-length-conflict", head("POST /x HTTP/1.1", "Content-Length: 5", "Content-Length: 6"), 400),
    # Even with the same value (RFC 9110 8.6 lets a server take it as one; llhttp, like nginx, refuses it).
    ("content-length-repeated", head("POST /x HTTP/1.1", "Content-Length: 7", "content-length: 7"), 400),
    # A number int() will not read (over 4300 digits) is a refusal, not a ValueError.
    ("content-length-huge", head("POST /x HTTP/1.1", "Content-Length: " + "9" * 5000), 400),
    ("content-length-19-digits", head("POST /x HTTP/1.1", "Content-Length: " + "1" * 19), 400),
    ("cl-and-te", head("POST /x HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked"), 400),
    ("te-and-cl", head("POST /x HTTP/1.1", "Transfer-Encoding: chunked", "Content-Length: 5"), 400),
    ("te-on-http10", head("POST /x HTTP/1.0", "Transfer-Encoding: chunked"), 400),
    ("te-gzip", head("POST /x HTTP/1.1", "Transfer-Encoding: gzip"), 501),
    ("te-gzip-chunked", head("POST /x HTTP/1.1", "Transfer-Encoding: gzip, chunked"), 501),
    ("te-identity", head("POST /x HTTP/1.1", "Transfer-Encoding: identity"), 501),
    ("te-empty", head("POST /x HTTP/1.1", "Transfer-Encoding:"), 501),
    # Size.
    ("too-many-fields", head("GET / HTTP/1.1", *[f"H{i}: v" for i in range(MAX_FIELDS + 1)]), 431),
    ("head-too-large", head("GET / HTTP/1.1", "X-Big: " + "a" * MAX_HEAD), 431),
]


@pytest.mark.parametrize(("raw", "status"), [(raw, status) for _, raw, status in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
def test_refusals(raw: bytes, status: int) -> None:
    e = refused(raw)
    assert e.status == status
    assert e.message and str(e) == e.message


def test_a_tab_and_obs_text_in_a_value_are_read() -> None:
    # RFC 9110 5.5: HTAB and octets 0x80-0xFF (obs-text) are field-value characters.
    assert parse_request_head(b"GET / HTTP/1.1\r\nX-A: a\tb\xe9").headers == (("X-A", "a\tb\xe9"),)


def test_the_size_limits_are_checked_before_anything_else() -> None:
    # A huge head is refused for its size even when its first line is garbage: no work spent parsing it.
    assert refused(b"\x00" * (MAX_HEAD + 1)).status == 431
    assert refused(b"\r\n" * (MAX_FIELDS + 1)).status == 431


def test_a_head_of_exactly_max_head_is_read() -> None:
    line = "GET / HTTP/1.1\r\nX-Big: "
    raw = (line + "a" * (MAX_HEAD - len(line))).encode()
    assert len(raw) == MAX_HEAD
    assert parse_request_head(raw).headers[0][0] == "X-Big"


def test_messages_quote_the_offending_bytes_briefly() -> None:
    # The message goes back to the client: it names what was wrong without echoing a 64 KiB line.
    e = refused(head("GET / HTTP/1.1", "Bad Line" + "x" * 1000))
    assert "Bad Line" in e.message and len(e.message) < 200


# --- any bytes at all ----------------------------------------------------------------------------------

_NAMES = st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Expect", "Upgrade", "X-A", ""])
# Whole values that parse as something (numbers, Unicode digits, codings), and pieces of anything.
_WHOLE_VALUES = st.sampled_from([b"12", b"\xb2", b"1\xb2", b"\xb9\xb2", b"9" * 5000, b"9" * 19, b"chunked",
                                 b"gzip, chunked", b"close", b"a\x00b", b"\x1b[0m"])
_VALUE_PIECES = st.sampled_from([b"chunked", b"close", b"keep-alive", b"100-continue", b"\xb2", b"\x00",
                                b"9" * 30, b"0", b",", b" ", b"\t", b"\r", b"\n", b"-"])
_VALUES = _WHOLE_VALUES | st.lists(_VALUE_PIECES | st.binary(max_size=6), max_size=4).map(b"".join)
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES).map(lambda f: f[0].encode() + b": " + f[1]), max_size=6)
_LINES = st.sampled_from([b"POST /v1/x HTTP/1.1", b"GET / HTTP/1.0", b"GET http://h/ HTTP/1.1", b"GET / HTTP/2",
                          b"G\x00T / HTTP/1.1", b"GET /\x01 HTTP/1.1"])
# Mostly the shape of a head, so that the cases reach past the request line into the fields.
_HEADS = st.one_of(st.binary(max_size=300),
                   st.tuples(_LINES, _FIELDS).map(lambda h: b"\r\n".join([h[0], *h[1]])))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_HEADS)
def test_any_bytes_give_a_head_or_a_bad_request(raw: bytes) -> None:
    # Whatever a client sends, the server gets a head or BadRequest (its refusal), never another exception.
    try:
        parse_request_head(raw)
    except BadRequest as e:
        assert e.status in (400, 431, 501, 505)
