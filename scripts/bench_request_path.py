"""The gateway's Python cost per request, in one process, without the network: the number to judge a change of
the request path by (issue 18), where scripts/bench_gateway.py's run-to-run noise on a shared box is wider than
most such changes.

The real gateway app (build_gateway_app: its data-plane server, router, request pipeline with an inference
key, validation, routing, engine client, relay and metrics) serves requests written straight into one of its
connections, and its engine connection is answered from the event loop's next turn by a stand-in transport. So
what is timed is everything the gateway's Python does for a request and nothing of the kernel's: a system call
per read and write is the same for every design and is measured by bench_gateway.py (its tcp_relay target).

    .venv/bin/python scripts/bench_request_path.py               # non-streamed and streamed, us per request
    .venv/bin/python scripts/bench_request_path.py --profile     # and the calls each costs (cProfile)
    .venv/bin/python scripts/bench_request_path.py --evict-mb 8  # from cold caches, as at c=1

--evict-mb: a gateway at c=1 sleeps between two requests while the client and the engine run, and comes back
to caches they have filled. Its user time per request there is 3-4x this bench's warm figure (74-93 us against
22 compiled, bench_gateway.py on a 2-core EPYC), and vllm-router's is 62 us. Copying MB MiB before each request
evicts the caches the same way; the copy's own time, taken alone before each round, is taken off. There, a whole
answer compiled: 20 us warm, 36-49 with 8 MiB (22 and 52-61 before the value types made per request became plain
classes and the modules' constants Final); from source: 50, 70-74 with 4 MiB, 88-89 with 8. That is the figure
to judge a change of the path's footprint by (the objects and code a request touches), the warm one its
instructions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.upstream_http import _Connection
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps
from nebula.services.gateway.app import build_gateway_app, gateway_site
from nebula.services.gateway.state import GATEWAY

KEY = "bench-key"
ENDPOINT = "http://127.0.0.1:9"  # never dialled: the pool holds a stand-in connection to it (were that closed,
# the next request would dial, fail, and the run stop at its 502)
_BODY = json.dumps({"model": "m", "messages": [{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": "Say hello " * 20}],
                    "max_tokens": 32, "temperature": 0.7}).encode()


def request(stream: bool, key: str = KEY) -> bytes:
    """A chat request as the openai SDK sends it (its usual headers), with `key`."""
    body = _BODY[:-1] + (b', "stream": true}' if stream else b"}")
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: gzip, deflate\r\n"
            b"Connection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
            b"User-Agent: OpenAI/Python 1.99.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Retry-Count: 0\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def _whole_answer() -> bytes:
    body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 32},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 30, "completion_tokens": 32, "total_tokens": 62}}).encode()
    return (b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 21:00:00 GMT\r\nserver: uvicorn\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\ncontent-type: application/json\r\n\r\n" + body)


def _stream_answer(tokens: int) -> list[bytes]:
    """A vLLM stream as separate reads: the head, then one chunk per token, then usage and [DONE]."""
    def chunk(event: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(event), event)

    head = (b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 21:00:00 GMT\r\nserver: uvicorn\r\n"
            b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
    event = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
             b'"choices":[{"index":0,"delta":{"content":" hello"},"finish_reason":null}]}\n\n')
    return [head] + [chunk(event)] * tokens + [chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"]


class _Transport:
    """What the gateway's protocols use of a transport."""

    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: return self.closed
    def can_write_eof(self) -> bool: return True
    def write_eof(self) -> None: ...
    def get_write_buffer_size(self) -> int: return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class _Client(_Transport):
    """The client's side: notes where each answer ends, and stops the run at one that is not a 200."""

    def __init__(self) -> None:
        super().__init__()
        self.done: asyncio.Future[None] | None = None
        self.stream = False
        self.first = True  # the next write starts an answer

    def write(self, data: bytes) -> None:
        assert self.done is not None
        if self.first and not data.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"the gateway answered {data[:300]!r}")
        self.first = False
        if not self.stream or data.endswith(b"0\r\n\r\n"):
            self.done.set_result(None)

    def set_protocol(self, protocol: object) -> None:
        raise SystemExit(f"the data-plane server handed the request to {type(protocol).__name__}: what is timed "
                         "here must be the data-plane server's path")


class _Engine(_Transport):
    """The engine's side: each request is answered one read per piece, each piece from a later turn of the
    event loop than the one before (as tokens come apart in time), so the gateway handles every read alone."""

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, answers: dict[bool, list[bytes]]) -> None:
        super().__init__()
        self._conn, self._loop, self._answers = conn, loop, answers

    def write(self, data: bytes) -> None:
        self._loop.call_soon(self._send, self._answers[b'"stream": true' in data], 0)

    def _send(self, pieces: list[bytes], i: int) -> None:
        self._conn.data_received(pieces[i])
        if i + 1 < len(pieces):
            self._loop.call_soon(self._send, pieces, i + 1)


async def _measure(n: int, tokens: int, key: str, profile: cProfile.Profile | None,
                   modes: tuple[bool, ...] = (False, True), evict: Eviction | None = None) -> dict[str, float]:
    """CPU microseconds per request, best of 3 rounds of `n`, for a whole answer (False in `modes`) and a
    streamed one (True). The stand-in transports and a future per request are counted too (a few us).
    `evict`: run before each request; its own cost, timed alone before each round, is taken off that round."""
    loop = asyncio.get_running_loop()
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="org/m").to_dict()))
    status = InstanceStatus(instance="m", model="m", node="n1", phase=Phase.READY, endpoint=ENDPOINT)
    await store.put(keys.instance_key("m"), dumps(status.to_dict()))
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    app = build_gateway_app(GatewayConfig(api_key_hashes=(digest,), load_poll_s=3600.0), store, CollectorRegistry())
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        st = app[GATEWAY]
        for _ in range(500):
            if st.table.ready().get("m"):
                break
            await asyncio.sleep(0.01)
        else:
            raise SystemExit("the gateway did not see the model's replica")
        answers = {False: [_whole_answer()], True: _stream_answer(tokens)}

        engine = _Connection(st.upstream, ("127.0.0.1", 9))  # ENDPOINT's (host, port): the pool's key for it
        engine.connection_made(_Engine(engine, loop, answers))  # type: ignore[arg-type]
        st.upstream.put_back(engine)  # one request at a time: each takes it and puts it back
        site = gateway_site(runner, "127.0.0.1", 0)
        client = _Client()
        conn = site.server()
        conn.connection_made(client)  # type: ignore[arg-type]
        out: dict[str, float] = {}
        for stream in modes:
            client.stream = stream
            raw = request(stream, key)

            async def one(raw: bytes) -> None:
                if evict is not None:
                    evict.run()
                client.done, client.first = loop.create_future(), True
                conn.data_received(raw)
                await client.done

            for _ in range(min(n, 2000)):  # warm: the pool's connection, the metric children, the caches
                await one(raw)
            best = float("inf")
            for _ in range(3):
                alone = evict.time(n) if evict is not None else 0.0  # beside each round: the copy's noise is the box's
                if profile is not None:
                    profile.enable()
                started = time.process_time()
                for _ in range(n):
                    await one(raw)
                best = min(best, (time.process_time() - started) / n * 1e6 - alone)
                if profile is not None:
                    profile.disable()
            out["streamed" if stream else "non-streamed"] = best
        return out
    finally:
        await runner.cleanup()


class Eviction:
    """Copy `mib` MiB from one buffer to another: what a request meets after others ran on its core."""

    def __init__(self, mib: int) -> None:
        self._src, self._dst = bytearray(mib << 20), bytearray(mib << 20)

    def run(self) -> None:
        self._dst[:] = self._src

    def time(self, rounds: int) -> float:
        """Microseconds per copy, alone."""
        started = time.process_time()
        for _ in range(rounds):
            self.run()
        return (time.process_time() - started) / rounds * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="requests per measurement (best of 3)")
    ap.add_argument("--tokens", type=int, default=32, help="streamed tokens, one engine read each")
    ap.add_argument("--profile", action="store_true", help="print the calls that cost most (cProfile)")
    ap.add_argument("--only", choices=("whole", "streamed"), help="time one kind of answer only")
    ap.add_argument("--key", default=KEY, help="the key the requests carry (the gateway takes only its own)")
    ap.add_argument("--evict-mb", type=int, default=0, metavar="MB",
                    help="copy MB MiB between two requests, its cost taken off: the path from cold caches")
    args = ap.parse_args()
    profile = cProfile.Profile() if args.profile else None
    modes = (False, True) if not args.only else (args.only == "streamed",)
    evict = Eviction(args.evict_mb) if args.evict_mb > 0 else None
    figures = uvloop.run(_measure(args.n, args.tokens, args.key, profile, modes, evict))
    cold = f", caches evicted ({args.evict_mb} MiB copied before each, the copy's own time taken off)" \
        if evict is not None else ""
    for name, us in figures.items():
        extra = f" ({args.tokens} tokens, one read each)" if name == "streamed" else ""
        print(f"{name} request{extra}: {us:.1f} us of the gateway's Python{cold}")
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
