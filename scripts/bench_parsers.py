"""CPU of the gateway's HTTP/1.1 parsing, both directions, per call (issue 18: the data path on llhttp).

Prints microseconds per call and, for the request head, the ratio to the way llhttp is commonly driven from
Python (as the gateway did before): a Python callback per header field, each name and value decoded apart.
The gateway instead lets llhttp accept or refuse the head and then reads the fields from its decoded lines.

    .venv/bin/python scripts/bench_parsers.py            # ~10 s
    .venv/bin/python scripts/bench_parsers.py --n 50000
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable

import httptools

from nebula.adapters.http1_parser import ResponseHead, ResponseParser
from nebula.adapters.http1_request import parse_request_head

# What the OpenAI Python SDK sends (httpx), key and all: a typical inference request's head.
REQUEST_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.example:8080\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\n"
    b"Authorization: Bearer nbk_0123456789abcdef0123456789abcdef0123\r\nContent-Length: 742")
# vLLM's answer to a non-streamed request (uvicorn's head), and a read of a token stream.
RESPONSE = (b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 21:00:00 GMT\r\nserver: uvicorn\r\ncontent-length: 64\r\n"
            b"content-type: application/json\r\n\r\n" + b'{"id":"x","choices":[{"message":{"content":"hello"}}]}      ')
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 21:00:00 GMT\r\nserver: uvicorn\r\n"
               b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
EVENT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"delta":{"content":" fox"}}]}\n\n'
CHUNK = f"{len(EVENT):x}\r\n".encode() + EVENT + b"\r\n"


class _Sink:
    def on_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...


class _PerField:
    """The baseline: llhttp hands each field to Python."""

    __slots__ = ("complete", "fields", "target")

    def __init__(self) -> None:
        self.target, self.complete = b"", False
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def per_field_head(raw: bytes) -> list[tuple[str, str]]:
    got = _PerField()
    httptools.HttpRequestParser(got).feed_data(raw + b"\r\n\r\n")
    headers = []
    for name_b, value_b in got.fields:
        name, value = name_b.decode("latin-1"), value_b.strip(b" \t").decode("latin-1")
        headers.append((name, value))
        name.lower()
    return headers


def per_call_us(fn: Callable[[], object], n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="calls per measurement (best of 3)")
    n = ap.parse_args().n

    fields = REQUEST_HEAD.count(b"\r\n")
    ours = per_call_us(lambda: parse_request_head(REQUEST_HEAD), n)
    base = per_call_us(lambda: per_field_head(REQUEST_HEAD), n)
    print(f"request head, {fields} fields: parse_request_head {ours:.2f} us (all checks, RequestHead built); "
          f"llhttp with a callback per field {base:.2f} us (no checks) -> {ours / base:.2f}x")

    sink = _Sink()
    parser = ResponseParser()

    def whole_response() -> None:
        parser.reset(sink)
        parser.feed(RESPONSE)

    print(f"non-streamed response, head and body in one read: {per_call_us(whole_response, n):.2f} us")
    for events, label in ((1, "one chunk"), (4, "four chunks")):
        read = CHUNK * events
        for passthrough in (False, True):
            parser.reset(sink)
            parser.feed(STREAM_HEAD)
            if passthrough:
                parser.passthrough()
            mode = "passthrough" if passthrough else "de-chunked"
            us = per_call_us(functools.partial(parser.feed, read), n)
            print(f"streamed read, {label}, {mode}: {us:.2f} us")


if __name__ == "__main__":
    main()
