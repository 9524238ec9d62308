"""The engine hop's HTTP/1.1 response parser: every framing, fed whole, byte by byte and split at every
position, must give the same head and body; malformed responses raise ProtocolError."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.adapters.http1_parser import ProtocolError, ResponseHead, ResponseParser


class Sink:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.body = b""
        self.pieces = 0
        self.completed = 0

    def on_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        assert data, "an empty body piece"
        self.body += data
        self.pieces += 1

    def on_complete(self) -> None:
        self.completed += 1


def parse(parts: list[bytes], eof: bool = False) -> Sink:
    sink = Sink()
    parser = ResponseParser(sink)
    for part in parts:
        parser.feed(part)
    if eof:
        parser.feed_eof()
    return sink


SSE = [b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in SSE) + b"0\r\nX-Trailer: t\r\n\r\n")
# As vLLM (uvicorn) frames a token stream: no extensions, one event per chunk.
CHUNKED_PLAIN = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                 + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in SSE) + b"0\r\n\r\n")
FIXED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"ok\": true}\n"
CLOSE_DELIMITED = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
CASES = [(CHUNKED, b"".join(SSE), False), (CHUNKED_PLAIN, b"".join(SSE), False), (FIXED, b'{"ok": true}\n', False),
         (CLOSE_DELIMITED, b"until the end", True)]


@pytest.mark.parametrize(("raw", "body", "eof"), CASES,
                         ids=["chunked", "chunked-plain", "content-length", "until-close"])
def test_every_split_gives_the_same_response(raw: bytes, body: bytes, eof: bool) -> None:
    whole = parse([raw], eof)
    assert whole.body == body and whole.completed == 1 and len(whole.heads) == 1
    assert parse([raw[i:i + 1] for i in range(len(raw))], eof).body == body
    for cut in range(1, len(raw)):
        sink = parse([raw[:cut], raw[cut:]], eof)
        assert (sink.body, sink.completed, sink.heads) == (body, 1, whole.heads), cut


@pytest.mark.parametrize("raw", [CHUNKED, CHUNKED_PLAIN], ids=["extensions", "plain"])
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(CHUNKED_PLAIN) - 1), max_size=8))
def test_any_splits_of_a_chunked_stream(raw: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted(set(cuts)), len(raw)]
    sink = parse([raw[a:b] for a, b in itertools.pairwise(edges)])
    assert sink.body == b"".join(SSE) and sink.completed == 1


def test_chunks_that_arrive_together_are_passed_on_as_one_piece() -> None:
    sink = parse([CHUNKED])
    assert sink.pieces == 1


def test_a_chunk_per_read_is_a_piece_per_read() -> None:
    head = CHUNKED_PLAIN.partition(b"\r\n\r\n")[0]
    reads = [head + b"\r\n\r\n"] + [b"%x\r\n%s\r\n" % (len(e), e) for e in SSE] + [b"0\r\n\r\n"]
    assert b"".join(reads) == CHUNKED_PLAIN
    sink = parse(reads)
    assert sink.pieces == len(SSE) and sink.body == b"".join(SSE) and sink.completed == 1


def test_head_fields() -> None:
    head = parse([FIXED]).heads[0]
    assert (head.status, head.reason, head.content_length, head.keep_alive) == (200, "OK", 13, True)
    assert ("Content-Type", "application/json") in head.headers
    assert parse([CHUNKED]).heads[0].content_length is None
    close = parse([CLOSE_DELIMITED], eof=True).heads[0]
    assert not close.keep_alive and close.content_length is None
    assert not parse([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"]).heads[0].keep_alive


def test_interim_heads_are_skipped_and_bodiless_answers_complete_at_once() -> None:
    sink = parse([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"])
    assert [h.status for h in sink.heads] == [204] and sink.completed == 1 and sink.body == b""


def test_a_tab_and_obs_text_in_a_value_are_read() -> None:
    sink = parse([b"HTTP/1.1 200 OK\r\nX-A: a\tb\xe9\r\nContent-Length: 0\r\n\r\n"])
    assert sink.heads[0].headers[0] == ("X-A", "a\tb\xe9")


def test_many_interim_heads_are_no_recursion() -> None:
    # Each interim head used to be one more recursive feed: a few thousand in one read overflowed the stack.
    sink = parse([b"HTTP/1.1 100 Continue\r\n\r\n" * 3000 + FIXED])
    assert sink.completed == 1 and sink.body == b'{"ok": true}\n'


def test_chunked_wins_over_a_content_length() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    sink = parse([raw])
    assert sink.body == b"hello" and sink.heads[0].content_length is None


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi, and more",
    b"HTTP/1.1 204 No Content\r\n\r\nstray",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",  # '\xb2'.isdigit() is True, int() refuses it
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",  # over int()'s 4300 digits
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 19 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",  # values go on to the client
    b"HTTP/1.1 200 OK\r\nX-A: \x1b[31m\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: \x7f\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\x00OK\r\nContent-Length: 0\r\n\r\n",
], ids=["version", "status", "header", "negative-length", "two-lengths", "coding", "size", "signed-size",
        "no-crlf", "extra-bytes", "body-on-204", "superscript-length", "huge-length", "19-digit-length",
        "nul-in-value", "escape-in-value", "del-in-value", "nul-in-reason"])
def test_malformed_responses_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse([raw])


def test_a_head_without_end_is_bounded() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        parse([b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000])


@pytest.mark.parametrize("raw", [FIXED[:-3], CHUNKED[:-10], b"HTTP/1.1 200 OK\r\nContent-"])
def test_a_close_before_the_end_is_an_error(raw: bytes) -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(raw)
    with pytest.raises(ProtocolError, match="before the response was complete"):
        parser.feed_eof()
    assert sink.completed == 0


def test_reset_parses_the_next_response() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(FIXED)
    assert parser.done
    parser.reset(sink)
    assert not parser.started
    parser.feed(FIXED)
    assert sink.completed == 2


def test_a_keep_alive_connection_parses_every_framing_in_turn() -> None:
    """One parser for a connection's life: after each whole response the next, of any framing, parses alike
    (llhttp's parser is kept between them)."""
    sink = Sink()
    parser = ResponseParser(sink)
    for raw in [FIXED, CHUNKED, b"HTTP/1.1 100 Continue\r\n\r\n" + FIXED, CHUNKED, FIXED]:
        parser.reset(sink)
        parser.feed(raw)
        assert parser.done
    assert sink.completed == 5
    assert [h.status for h in sink.heads] == [200] * 5


def test_a_response_cut_short_leaves_nothing_behind_for_the_next() -> None:
    """A response abandoned mid-body (the connection is closed, but the parser is reset all the same) leaves no
    state in llhttp for the next: the next response is read from its first byte."""
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(FIXED[:-3])
    parser.reset(sink)
    parser.feed(FIXED)
    assert parser.done and sink.completed == 1


def test_after_a_closing_response_the_next_is_parsed_from_scratch() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(FIXED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    assert parser.done and not sink.heads[0].keep_alive
    parser.reset(sink)
    parser.feed(FIXED)
    assert parser.done and sink.completed == 2


def test_a_parser_given_no_response_refuses_bytes() -> None:
    with pytest.raises(ProtocolError, match="no response was expected"):
        ResponseParser().feed(FIXED)


# --- any bytes at all ----------------------------------------------------------------------------------

_NAMES = st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"content-length", b""])
# Whole values that parse as something (numbers, Unicode digits, codings), and pieces of anything.
_WHOLE_VALUES = st.sampled_from([b"12", b"\xb2", b"1\xb2", b"\xb9\xb2", b"9" * 5000, b"9" * 19, b"chunked",
                                 b"gzip, chunked", b"close", b"a\x00b", b"\x1b[0m"])
_VALUE_PIECES = st.sampled_from([b"chunked", b"close", b"keep-alive", b"\xb2", b"\x00", b"9" * 30, b"0", b"12",
                                b",", b" ", b"\t", b"\r", b"\n", b"-"])
_VALUES = _WHOLE_VALUES | st.lists(_VALUE_PIECES | st.binary(max_size=6), max_size=4).map(b"".join)
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES).map(lambda f: f[0] + b": " + f[1] + b"\r\n"), max_size=6)
_BODIES = st.lists(st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n", b"ff;x\r\n", b"\r\n", b"abc"])
                   | st.binary(max_size=8), max_size=6).map(b"".join)
_STATUS = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 100 Continue", b"HTTP/1.1 204 x",
                           b"HTTP/1.1 304", b"HTTP/2 200 OK"])
# Mostly the shape of a response, so that the cases reach the fields, the framing and the body.
_RESPONSES = st.one_of(st.binary(max_size=300), st.tuples(_STATUS, _FIELDS, _BODIES).map(
    lambda r: r[0] + b"\r\n" + b"".join(r[1]) + b"\r\n" + r[2]))


class _Quiet:
    def on_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_RESPONSES, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6), eof=st.booleans())
def test_any_bytes_whole_or_split_raise_only_protocol_errors(raw: bytes, cuts: list[int], eof: bool) -> None:
    # An engine's bytes, however broken and however split, give a response or ProtocolError (which the
    # client maps to a failed attempt), never another exception.
    for parts in ([raw], [raw[a:b] for a, b in itertools.pairwise([0, *sorted(set(cuts)), len(raw)])]):
        parser = ResponseParser(_Quiet())
        try:
            for part in parts:
                parser.feed(part)
            if eof:
                parser.feed_eof()
        except ProtocolError:
            pass


# --- passthrough: the engine's framing forwarded as it came --------------------------------------------------


def test_passthrough_hands_on_each_read_with_its_framing_and_still_finds_the_end() -> None:
    head, _, body = CHUNKED.partition(b"\r\n\r\n")
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(head + b"\r\n\r\n")
    parser.passthrough()
    reads = [body[:7], body[7:60], body[60:]]  # splits anywhere: mid size line, mid data, the trailer
    for read in reads:
        parser.feed(read)
    assert sink.body == body and sink.pieces == 3 and sink.completed == 1 and parser.done


def test_passthrough_checks_a_read_before_handing_any_of_it_on() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(CHUNKED_PLAIN.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    parser.passthrough()
    parser.feed(b"5\r\nhello\r\n")
    with pytest.raises(ProtocolError):
        parser.feed(b"5\r\nworld\r\nzz\r\n")  # a good chunk, then a bad size: none of the read goes on
    assert sink.body == b"5\r\nhello\r\n" and sink.completed == 0


def test_passthrough_of_a_read_running_past_the_end_is_refused() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.feed(CHUNKED_PLAIN.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    parser.passthrough()
    with pytest.raises(ProtocolError, match="after the end"):
        parser.feed(b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert sink.body == b""
