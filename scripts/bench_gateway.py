#!/usr/bin/env python3
"""Benchmark of Nebula's data path against a bare single-hop reverse proxy (issue 3, "Speed").

One run on loopback starts, each in its own process:
  - an engine simulator answering /v1/chat/completions like vLLM (SSE chunks ending in `data: [DONE]`,
    or one JSON body), with a TTFT, a per-token delay and a token count taken from each request;
  - the baseline: a minimal aiohttp reverse proxy (read body, POST it to the engine, stream bytes back);
  - Nebula's real data path: etcd and `python -m nebula gateway run` (which picks the replica and forwards to
    it: one hop), with an inference key (auth on) and /metrics, the simulator registered in etcd as a READY
    instance. With --nebula-src pointing at a tree that still has the separate router (the two-hop design),
    `nebula router run` is started too and its CPU counts, so the two designs can be compared on one box;
  - a load generator per measurement (fixed concurrency, a warm-up then a measured window of seconds).
  - two external baselines (issue 18; scripts/bench_baselines.py): vllm-router, the Rust router the vLLM
    project ships (pip package vllm-router, in a venv of its own), and Debian's nginx, each in front of the
    same engine, each with one worker thread/process as the gateway and the proxy have. One not installed
    is skipped, and the tables say why and how to install it.
Each scenario runs against direct-to-engine, the proxy, Nebula and the baselines, interleaved so that noise
from other work on the box hits all of them alike. CPU per request (and per streamed token) is read from
/proc/<pid>/stat (utime+stime, all threads, live child processes included) of the processes a request
crosses (the gateway, plus the router in a two-hop tree; the proxy; vllm-router's process; nginx's master
and worker), engine and load generator excluded, and given as a ratio to vllm-router's.

    .venv/bin/python scripts/bench_gateway.py                 # all scenarios, ~3 minutes on 2 cores
    .venv/bin/python scripts/bench_gateway.py --scale 0.5     # shorter measurements
    .venv/bin/python scripts/bench_gateway.py --profile DIR   # the gateway under cProfile -> DIR/*.pstats
    .venv/bin/python scripts/bench_gateway.py --profile DIR --py-spy /tmp/pyspy/bin/py-spy   # sampled, per hop
    .venv/bin/python scripts/bench_gateway.py profile-summary DIR/stream32_c64-gateway.txt
    .venv/bin/python scripts/bench_gateway.py --nebula-src /tmp/head   # services from another tree
    .venv/bin/python scripts/bench_gateway.py --gateway-workers 4      # the gateway as 4 processes on its port
    .venv/bin/python scripts/bench_gateway.py --uvloop-proxy          # the proxy on uvloop too, same run
    .venv/bin/python scripts/bench_gateway.py --compare-event-loops   # a second gateway on asyncio's loop
    .venv/bin/python scripts/bench_gateway.py --vllm-router /opt/vr/bin/vllm-router --nginx /usr/sbin/nginx
    .venv/bin/python scripts/bench_gateway.py --baselines ''          # without vllm-router and nginx

The engine's timing travels in the request body (`bench_ttft_ms`, `bench_tpot_ms`, `max_tokens`): Nebula
forwards unknown fields unchanged, so one engine process serves every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import bench_baselines  # scripts/bench_baselines.py: this file's directory is sys.path[0]
from aiohttp import web

# The repository root, so `import nebula` works however the script is started; BENCH_NEBULA_SRC (set by
# --nebula-src for the services it starts) points at another tree, e.g. an export of a commit.
ROOT = Path(__file__).resolve().parent.parent
SRC = Path(os.environ.get("BENCH_NEBULA_SRC") or ROOT).resolve()
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from nebula.core import keys  # noqa: E402
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps  # noqa: E402

MODEL = "bench"
API_KEY = "bench-inference-key"
HOST = "127.0.0.1"  # loopback only, everywhere
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"  # Anthropic's Messages API (the `messages_*` scenarios)
RESPONSES_PATH = "/v1/responses"  # OpenAI's Responses API (the `responses_*` scenarios)
PATHS = {"chat": PATH, "messages": MESSAGES_PATH, "responses": RESPONSES_PATH}
# What a streamed Messages answer ends with (Anthropic's streaming documentation; vLLM writes the same).
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


# ---------------------------------------------------------------------------------------------------------
# Engine simulator
# ---------------------------------------------------------------------------------------------------------

def _sse(req_id: str, model: str, delta: str, finish: str | None) -> bytes:
    fin = "null" if finish is None else f'"{finish}"'
    return (f'data: {{"id":"{req_id}","object":"chat.completion.chunk","created":1,"model":"{model}",'
            f'"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{fin}}}]}}\n\n').encode()


async def _engine_chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    model = str(body.get("model", MODEL))
    tokens = int(body.get("max_tokens") or 16)
    ttft = float(body.get("bench_ttft_ms", 0)) / 1000
    tpot = float(body.get("bench_tpot_ms", 0)) / 1000
    req_id = f"chatcmpl-{id(request):x}"
    loop = asyncio.get_running_loop()
    start = loop.time()
    if not body.get("stream"):
        if ttft + tokens * tpot > 0:
            await asyncio.sleep(ttft + tokens * tpot)
        return web.json_response({
            "id": req_id, "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * tokens},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
        })
    # Headers go out at once (as vLLM's StreamingResponse does); the first body byte comes after TTFT.
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if ttft > 0:
        await asyncio.sleep(ttft)
    await resp.write(_sse(req_id, model, '{"role":"assistant","content":""}', None))
    token = _sse(req_id, model, '{"content":" tok"}', None)
    for i in range(tokens):
        if tpot > 0:
            # Sleep to an absolute schedule so timer slack does not accumulate over 128 tokens.
            delay = start + ttft + (i + 1) * tpot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await resp.write(token)
    await resp.write(_sse(req_id, model, "{}", "length") + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _event(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _engine_messages(request: web.Request) -> web.StreamResponse:
    """vLLM's /v1/messages as the engine simulator: Anthropic's message, or its SSE event sequence."""
    body = json.loads(await request.read())
    model = str(body.get("model", MODEL))
    tokens = int(body.get("max_tokens") or 16)
    ttft = float(body.get("bench_ttft_ms", 0)) / 1000
    tpot = float(body.get("bench_tpot_ms", 0)) / 1000
    msg_id = f"msg_{id(request):x}"
    usage = f'{{"input_tokens":10,"output_tokens":{tokens}}}'
    if not body.get("stream"):
        if ttft + tokens * tpot > 0:
            await asyncio.sleep(ttft + tokens * tpot)
        return web.json_response({
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": " tok" * tokens}], "stop_reason": "max_tokens",
            "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": tokens}})
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if ttft > 0:
        await asyncio.sleep(ttft)
    await resp.write(_event("message_start", f'{{"type":"message_start","message":{{"id":"{msg_id}","type":'
                                             f'"message","role":"assistant","model":"{model}","content":[],'
                                             f'"stop_reason":null,"stop_sequence":null,"usage":{usage}}}}}')
                     + _event("content_block_start", '{"type":"content_block_start","index":0,'
                                                     '"content_block":{"type":"text","text":""}}'))
    token = _event("content_block_delta", '{"type":"content_block_delta","index":0,'
                                          '"delta":{"type":"text_delta","text":" tok"}}')
    for i in range(tokens):
        if tpot > 0:
            delay = start + ttft + (i + 1) * tpot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await resp.write(token)
    await resp.write(_event("content_block_stop", '{"type":"content_block_stop","index":0}')
                     + _event("message_delta", f'{{"type":"message_delta","delta":{{"stop_reason":"max_tokens",'
                                               f'"stop_sequence":null}},"usage":{usage}}}')
                     + MESSAGE_STOP)
    await resp.write_eof()
    return resp


async def _engine_responses(request: web.Request) -> web.StreamResponse:
    """vLLM's /v1/responses as the engine simulator: the response, or its SSE events (created, text deltas,
    completed); the response's id is the body's request_id, as vLLM's is (the gateway sets it)."""
    body = json.loads(await request.read())
    tokens = int(body.get("max_output_tokens") or 16)
    ttft = float(body.get("bench_ttft_ms", 0)) / 1000
    tpot = float(body.get("bench_tpot_ms", 0)) / 1000
    response = {"id": str(body.get("request_id", f"resp_{id(request):x}")), "object": "response",
                "model": str(body.get("model", MODEL)), "status": "incomplete",
                "output": [{"type": "message", "role": "assistant", "status": "incomplete",
                            "content": [{"type": "output_text", "text": " tok" * tokens, "annotations": []}]}],
                "usage": {"input_tokens": 10, "output_tokens": tokens, "total_tokens": 10 + tokens}}
    if not body.get("stream"):
        if ttft + tokens * tpot > 0:
            await asyncio.sleep(ttft + tokens * tpot)
        return web.json_response(response)
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if ttft > 0:
        await asyncio.sleep(ttft)
    created = json.dumps({"type": "response.created", "response": {**response, "status": "in_progress",
                                                                  "output": []}})
    await resp.write(_event("response.created", created))
    token = _event("response.output_text.delta", '{"type":"response.output_text.delta","item_id":"msg_1",'
                                                 '"output_index":0,"content_index":0,"delta":" tok"}')
    for i in range(tokens):
        if tpot > 0:
            delay = start + ttft + (i + 1) * tpot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await resp.write(token)
    await resp.write(_event("response.completed", json.dumps({"type": "response.completed", "response": response})))
    await resp.write_eof()
    return resp


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="")


def engine_app() -> web.Application:
    app = web.Application()
    app.router.add_post(PATH, _engine_chat)
    app.router.add_post(MESSAGES_PATH, _engine_messages)
    app.router.add_post(RESPONSES_PATH, _engine_responses)
    app.router.add_get("/health", _ok)
    return app


# ---------------------------------------------------------------------------------------------------------
# Minimal single-hop reverse proxy (the baseline)
# ---------------------------------------------------------------------------------------------------------

SESSION = web.AppKey("session", aiohttp.ClientSession)


def proxy_app(upstream: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[SESSION].post(upstream + request.path_qs, data=body,
                                             headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": up.headers.get("Content-Type", "application/json")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application) -> Any:
        # No pool cap and no decompression: a proxy passes bytes on as they come (as Nebula's engine hop does).
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/{tail:.*}", handle)
    return app


def serve(app: web.Application, port: int, use_uvloop: bool = False) -> None:
    # No access log in either baseline or simulator: Nebula's services run without one too.
    loop = None
    if use_uvloop:
        # The --uvloop-proxy experiment; uvloop must be importable (e.g. PYTHONPATH=/tmp/deps).
        import importlib

        loop = importlib.import_module("uvloop").new_event_loop()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, loop=loop)


# ---------------------------------------------------------------------------------------------------------
# Load generator
# ---------------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads) and of its live child processes (gateway workers), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    total = (int(rest[11]) + int(rest[12])) / CLK_TCK
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:
        kids = []
    for kid in kids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(kid)
    return total


@dataclass
class LoadResult:
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    wall_s: float = 0.0
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)


def request_body(args: argparse.Namespace) -> bytes:
    # A chat of realistic size: the gateway parses the whole body, so its length matters.
    words = ("the quick brown fox jumps over the lazy dog " * (args.prompt_bytes // 44 + 1))[:args.prompt_bytes]
    if args.api == "responses":
        return json.dumps({
            "model": MODEL, "stream": args.stream, "max_output_tokens": args.tokens,
            "bench_ttft_ms": args.ttft_ms, "bench_tpot_ms": args.tpot_ms,
            "instructions": "You are a helpful assistant.", "input": words,
        }).encode()
    if args.api == "messages":
        return json.dumps({
            "model": MODEL, "stream": args.stream, "max_tokens": args.tokens,
            "bench_ttft_ms": args.ttft_ms, "bench_tpot_ms": args.tpot_ms,
            "system": "You are a helpful assistant.", "messages": [{"role": "user", "content": words}],
        }).encode()
    return json.dumps({
        "model": MODEL, "stream": args.stream, "max_tokens": args.tokens,
        "bench_ttft_ms": args.ttft_ms, "bench_tpot_ms": args.tpot_ms,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": words}],
    }).encode()


class Window:
    """Which completions count: those that end while `recording` is set (the steady-state window)."""

    def __init__(self) -> None:
        self.recording = False
        self.stopping = False


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                      stream: bool, res: LoadResult, window: Window, api: str = "chat") -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            first = 0.0
            parts: list[bytes] = []
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                parts.append(chunk)
            end = time.perf_counter()
            data = b"".join(parts)
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            if stream and api == "responses":
                if data.rfind(b"event: response.completed\n") < 0 or not data.endswith(b"\n\n"):
                    raise RuntimeError("stream did not end with response.completed")
                tokens = data.count(b'"type":"response.output_text.delta"')
            elif api == "responses":
                tokens = int(json.loads(data)["usage"]["output_tokens"])
                first = end
            elif stream and api == "messages":
                if not data.endswith(MESSAGE_STOP):
                    raise RuntimeError("stream did not end with message_stop")
                tokens = data.count(b'"text_delta"')
            elif stream:
                if not data.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError("stream did not end with [DONE]")
                tokens = data.count(b'"delta":{"content":')
            elif api == "messages":
                tokens = int(json.loads(data)["usage"]["output_tokens"])
                first = end
            else:
                tokens = int(json.loads(data)["usage"]["completion_tokens"])
                first = end  # non-streaming: the answer is usable only once complete
    except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, KeyError) as e:
        # Errors count whenever they happen: a failure during warm-up is still a failure.
        res.errors += 1
        res.first_error = res.first_error or repr(e)
        return
    if window.recording:
        res.ok += 1
        res.tokens += tokens
        res.ttft_ms.append((first - t0) * 1000)
        res.total_ms.append((end - t0) * 1000)


async def load(args: argparse.Namespace) -> LoadResult:
    """Closed loop at fixed concurrency, measured in steady state.

    Workers run without pause from warm-up through the window and beyond; only requests that complete
    inside the window are recorded, and CPU is read at the window's edges. In steady state the work in
    flight is the same at both edges, so completions x CPU per request matches the CPU spent in the window,
    and a ramp-up or drain (128 identical requests started at once) does not distort throughput.
    """
    body = request_body(args)
    headers = {"Content-Type": "application/json"}
    if args.key:
        # Anthropic's clients send their key in x-api-key; the gateway takes it there too.
        headers["x-api-key" if args.api == "messages" else "Authorization"] = (
            args.key if args.api == "messages" else f"Bearer {args.key}")
    pids = {name: int(pid) for name, pid in (p.split("=") for p in args.pids.split(",") if p)}
    res = LoadResult()
    window = Window()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    # Spread the workers' first requests over one request's duration: with identical slow requests,
    # starting all at once would keep them in lock-step bursts that no real traffic has.
    spread_s = (args.ttft_ms + args.tokens * args.tpot_ms) / 1000

    async def worker(i: int) -> None:
        await asyncio.sleep(spread_s * i / args.concurrency)
        while not window.stopping:
            await one_request(session, args.url, body, headers, args.stream, res, window, args.api)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        try:
            await asyncio.sleep(args.warmup_s + spread_s)
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            window.recording = True
            await asyncio.sleep(args.duration_s)
            window.recording = False
            res.wall_s = time.perf_counter() - t0
            res.cpu_s = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            window.stopping = True
            # Requests in flight finish unrecorded; bounded by the request timeout.
            await asyncio.wait_for(asyncio.gather(*tasks), args.request_timeout_s + 5)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return res


def loadgen_main(args: argparse.Namespace) -> None:
    res = asyncio.run(load(args))
    print(json.dumps(asdict(res)))


# ---------------------------------------------------------------------------------------------------------
# Profiled Nebula service (only with --profile): the real `nebula <svc> run` under cProfile
# ---------------------------------------------------------------------------------------------------------

def service_main(args: argparse.Namespace) -> None:
    import cProfile

    from nebula.cli.main import main

    prof = cProfile.Profile()
    try:
        prof.runcall(main, [args.service, "run"])  # returns on SIGTERM: the service shuts down in order
    finally:
        prof.dump_stats(args.out)


def profile_summary(path: Path, top: int) -> None:
    """Print where a py-spy raw profile (`frame;frame;... count` lines) spends its samples: by leaf
    function (self), by function anywhere on the stack (inclusive), and by the library of the leaf."""
    import re
    from collections import Counter

    frame_re = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = frame_re.match(frame)
            fn, file = (m["fn"], m["file"]) if m else (frame, "?")
            names.append(f"{fn} ({file.rsplit('site-packages/', 1)[-1].rsplit('/nebula/', 1)[-1]})")
        self_c[names[-1]] += n
        libs[_library(names[-1])] += n
        for name in set(names):
            incl[name] += n
    print(f"== {path.name}: {total} samples ==")
    for title, counter in (("self", self_c), ("inclusive", incl), ("leaf by library", libs)):
        print(f"-- {title} --")
        for name, n in counter.most_common(top):
            print(f"{100 * n / max(total, 1):6.1f}%  {name}")


def _library(frame: str) -> str:
    file = frame.rsplit("(", 1)[-1].rstrip(")")
    for lib in ("aiohttp", "yarl", "multidict", "prometheus_client", "grpc", "aetcd", "asyncio", "json",
                "logging", "services", "core", "adapters"):
        if file.startswith(lib + "/") or f"/{lib}/" in file:
            return lib
    return file


# ---------------------------------------------------------------------------------------------------------
# Orchestration: processes, etcd, scenarios, report
# ---------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Children get SIGTERM if this script dies without cleaning up (even on SIGKILL); Linux only.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every process this run started; `stop_all` ends them (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout: int | IO[bytes] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            # Own session: Ctrl-C reaches only this script, which then stops the children in order.
            proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, cwd=cwd,
                                    stdout=log if stdout is None else stdout, stderr=log,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def wait_until(check: Any, timeout_s: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = procs.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{procs.log_tail(name)}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}:\n{procs.log_tail(name)}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def http_ok(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bool:
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def etcd_put(endpoint: str, key: str, value: bytes) -> None:
    # etcd's JSON gateway: no gRPC client needed in this script.
    payload = json.dumps({"key": b64encode(key.encode()).decode(), "value": b64encode(value).decode()}).encode()
    req = urllib.request.Request(endpoint + "/v3/kv/put", data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


@dataclass
class Stack:
    engine_url: str
    proxy_url: str
    gateway_url: str
    pids: dict[str, dict[str, int]]  # target -> {process name: pid} whose CPU counts
    extra_url: dict[str, str] = field(default_factory=dict)  # optional targets (--uvloop-proxy, baselines)
    labels: dict[str, str] = field(default_factory=dict)  # baseline -> what ran, e.g. "nginx 1.22.1, ..."
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why it was not measured


def two_hop_config(ports: dict[str, int]) -> str:
    """The config lines of a two-hop tree: where the gateway finds the router, and the router's port."""
    port = ports["router"]
    return f'router_url = "http://{HOST}:{port}"\n\n[router]\nport = {port}\n'


def start_stack(procs: Processes, workdir: Path, profile_dir: Path | None, src: Path, sampled: bool,
                uvloop_proxy: bool, gateway_workers: int = 1, gateway_loop: str = "asyncio",
                compare_loops: bool = False) -> Stack:
    py, me = sys.executable, str(Path(__file__).resolve())
    ports = {name: free_port() for name in ("engine", "proxy", "etcd", "etcd_peer", "router", "gateway")}
    # A tree from before routing moved into the gateway needs its router service (and its config).
    hops = ("router", "gateway") if (src / "nebula" / "services" / "router").is_dir() else ("gateway",)
    engine_url = f"http://{HOST}:{ports['engine']}"
    engine = procs.start("engine", [py, me, "engine", "--port", str(ports["engine"])])
    proxy = procs.start("proxy", [py, me, "proxy", "--port", str(ports["proxy"]), "--upstream", engine_url])

    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        raise RuntimeError("the etcd binary is not on PATH")
    etcd_url, peer = f"http://{HOST}:{ports['etcd']}", f"http://{HOST}:{ports['etcd_peer']}"
    # Every ETCD_* variable would be read by etcd as a flag.
    etcd_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    procs.start("etcd", [etcd_bin, "--name", "bench", "--data-dir", str(workdir / "etcd"),
                         "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                         "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new"], env=etcd_env)

    config = workdir / "nebula.toml"
    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    config.write_text(f"""
[cluster]
etcd_endpoints = ["{etcd_url}"]

[gateway]
port = {ports['gateway']}
api_key_hashes = ["{key_hash}"]
admin_key_hashes = ["{hashlib.sha256(b'bench-admin-key').hexdigest()}"]
{f"workers = {gateway_workers}" if gateway_workers > 1 else ""}
event_loop = "{gateway_loop}"
{two_hop_config(ports) if "router" in hops else ""}
[log]
level = "info"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEBULA_", "ETCD_"))}
    env["NEBULA_CONFIG"] = str(config)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_NEBULA_SRC"] = str(src)

    wait_until(lambda: http_ok(engine_url + "/health"), 20, "engine /health", procs, "engine")
    wait_until(lambda: http_ok(etcd_url + "/health"), 20, "etcd /health", procs, "etcd")
    # Register the simulator as the READY replica of the model, as a node agent would.
    etcd_put(etcd_url, keys.model_key(MODEL), dumps(ModelSpec(name=MODEL, source="/bench").to_dict()))
    status = InstanceStatus(instance=MODEL, model=MODEL, node="bench-node", phase=Phase.READY,
                            endpoint=engine_url, since=time.time())
    etcd_put(etcd_url, keys.instance_key(MODEL), dumps(status.to_dict()))

    services: dict[str, int] = {}
    for svc in hops:
        argv = ([py, "-m", "nebula", svc, "run"] if profile_dir is None or sampled
                else [py, me, "service", svc, "--out", str(profile_dir / f"{svc}.pstats")])
        # cwd too: `python -m` puts the working directory first on sys.path.
        services[svc] = procs.start(svc, argv, env=env, cwd=src).pid

    gateway_url = f"http://{HOST}:{ports['gateway']}"
    probe = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    # Ready once a request crosses Nebula to the engine (the instance watch has seen the instance).
    wait_until(lambda: http_ok(gateway_url + PATH, probe, auth), 30, "a request through Nebula", procs, "gateway")
    stack = Stack(engine_url=engine_url, proxy_url=f"http://{HOST}:{ports['proxy']}", gateway_url=gateway_url,
                  pids={"direct": {}, "proxy": {"proxy": proxy.pid}, "nebula": services,
                        "_engine": {"engine": engine.pid}})
    if uvloop_proxy:
        # The same minimal proxy on uvloop, measured in the same run: what the event loop alone buys a hop.
        port = free_port()
        uv = procs.start("proxy_uvloop", [py, me, "proxy", "--port", str(port), "--upstream", engine_url,
                                          "--uvloop"])
        stack.extra_url["proxy_uvloop"] = f"http://{HOST}:{port}"
        stack.pids["proxy_uvloop"] = {"proxy_uvloop": uv.pid}
        wait_until(lambda: port_open(port), 20, "uvloop proxy", procs, "proxy_uvloop")
    if compare_loops and hops == ("gateway",):
        # A second gateway, the same in all but its event loop, measured in the same run: what the loop is worth
        # to the gateway is a few percent, less than the spread between runs on a shared box.
        other = "asyncio" if gateway_loop == "uvloop" else "uvloop"
        port = free_port()
        other_env = env | {"NEBULA_GATEWAY_PORT": str(port), "NEBULA_GATEWAY_EVENT_LOOP": other}
        gw = procs.start(f"gateway_{other}", [py, "-m", "nebula", "gateway", "run"], env=other_env, cwd=src)
        url = f"http://{HOST}:{port}"
        wait_until(lambda: http_ok(url + PATH, probe, auth), 30, f"a request through the {other} gateway", procs,
                   f"gateway_{other}")
        stack.extra_url[f"nebula_{other}"] = url
        stack.pids[f"nebula_{other}"] = {f"gateway_{other}": gw.pid}
    return stack


# The external baselines (scripts/bench_baselines.py), in the order they run and are shown; CPU ratios are
# given against the first.
BASELINES = ("vllm_router", "nginx")


def baselines_of(option: str) -> list[str]:
    """--baselines' names (vllm-router or vllm_router, nginx), in BASELINES' order."""
    names = {b.strip().replace("-", "_") for b in option.split(",") if b.strip()}
    if names - set(BASELINES):
        raise SystemExit(f"--baselines: unknown {', '.join(sorted(names - set(BASELINES)))} "
                         f"(known: vllm-router, nginx)")
    return [b for b in BASELINES if b in names]


def start_baselines(procs: Processes, stack: Stack, workdir: Path, args: argparse.Namespace) -> None:
    """Start the baselines --baselines asks for in front of the stack's engine, and add them to `stack`
    as targets; one not installed, or not answering, goes to `stack.skipped` with the reason instead."""
    for name in baselines_of(args.baselines):
        if name == "vllm_router":
            path, why = bench_baselines.find_vllm_router(args.vllm_router)
            if path is not None:
                start_baseline(procs, stack, bench_baselines.vllm_router(
                    path, HOST, free_port(), stack.engine_url, free_port(), args.vllm_router_threads))
        else:
            path, why = bench_baselines.find_nginx(args.nginx)
            if path is not None:
                start_baseline(procs, stack, bench_baselines.nginx(
                    path, workdir / "nginx", HOST, free_port(), stack.engine_url.removeprefix("http://")))
        if path is None:
            stack.skipped[name] = why
        if name in stack.skipped:
            print(f"{name} skipped: {stack.skipped[name]}", flush=True)


def start_baseline(procs: Processes, stack: Stack, baseline: bench_baselines.Baseline) -> None:
    proc = procs.start(baseline.name, baseline.argv, env=baseline.env)
    url = f"http://{HOST}:{baseline.port}"
    probe = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        # Ready once a request crosses it to the engine (vllm-router first waits for the engine's /health).
        wait_until(lambda: http_ok(url + PATH, probe, {"Content-Type": "application/json"}), 60,
                   f"a request through {baseline.label}", procs, baseline.name)
    except RuntimeError as e:
        procs.stop(baseline.name)
        stack.skipped[baseline.name] = (f"{baseline.label} did not come up: {str(e).splitlines()[0]} "
                                        f"(log: {procs.workdir / baseline.name}.log)")
        return
    stack.extra_url[baseline.name] = url
    stack.pids[baseline.name] = {baseline.name: proc.pid}
    stack.labels[baseline.name] = f"{baseline.label}, {baseline.how}"


def describe_baselines(stack: Stack) -> str:
    """What each baseline is and what its CPU figure covers (processes, threads), as /proc shows them now."""
    parts = []
    for name, label in stack.labels.items():
        nproc, nthreads = bench_baselines.process_tree(stack.pids[name][name])
        parts.append(f"{name} = {label} ({nproc} process{'es' if nproc != 1 else ''}, {nthreads} threads)")
    return "; ".join(parts)


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int
    tokens: int = 32
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    duration_s: float = 3.0  # the measured window, after warm_up_s (and the workers' start spread)
    warmup_s: float = 1.0
    api: str = "chat"  # which API the requests speak: "chat" (OpenAI's chat completions), "messages", "responses"


SCENARIOS = (
    Scenario("stream32_c1", stream=True, concurrency=1),
    Scenario("stream32_c64", stream=True, concurrency=64),
    Scenario("nonstream32_c1", stream=False, concurrency=1),
    Scenario("nonstream32_c64", stream=False, concurrency=64),
    Scenario("realistic_c128", stream=True, concurrency=128, tokens=128, ttft_ms=50, tpot_ms=10,
             duration_s=6.0, warmup_s=1.5),
    Scenario("messages_stream32_c64", stream=True, concurrency=64, api="messages"),
    Scenario("responses_stream32_c64", stream=True, concurrency=64, api="responses"),
)
TARGETS = ("direct", "proxy", "nebula")


def run_load(procs: Processes, stack: Stack, target: str, sc: Scenario, scale: float,
             py_spy: tuple[str, Path] | None = None) -> dict[str, Any]:
    base = ({"direct": stack.engine_url, "proxy": stack.proxy_url, "nebula": stack.gateway_url}
            | stack.extra_url)[target]
    pids = dict(stack.pids[target]) | stack.pids["_engine"]
    duration = sc.duration_s * scale
    argv = [sys.executable, str(Path(__file__).resolve()), "loadgen", "--url", base + PATHS[sc.api], "--api", sc.api,
            "--concurrency", str(sc.concurrency), "--duration-s", str(duration), "--warmup-s", str(sc.warmup_s),
            "--tokens", str(sc.tokens), "--ttft-ms", str(sc.ttft_ms), "--tpot-ms", str(sc.tpot_ms),
            "--pids", ",".join(f"{k}={v}" for k, v in pids.items())]
    if sc.stream:
        argv.append("--stream")
    if target.startswith("nebula"):
        argv += ["--key", API_KEY]
    name = f"loadgen-{sc.name}-{target}"
    proc = procs.start(name, argv, stdout=subprocess.PIPE)
    spies: list[str] = []
    if py_spy is not None and target not in BASELINES:
        # Sampling profiles of the processes the request crosses, over the warm-up and the window. The
        # sampler costs CPU on a small box: figures of a profiled run are not for comparison.
        for pname, pid in stack.pids[target].items():
            spies.append(f"py-spy-{sc.name}-{pname}")
            procs.start(spies[-1], [
                py_spy[0], "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--format", "raw",
                "--duration", str(int(sc.warmup_s + duration + 1)), "-o", str(py_spy[1] / f"{sc.name}-{pname}.txt")])
    try:
        out, _ = proc.communicate(timeout=sc.warmup_s + duration + 90)
        for spy in spies:
            procs.procs[spy].wait(30)  # it stops by itself after --duration, then writes its file
    finally:
        for n in [name, *spies]:
            procs.stop(n)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{procs.log_tail(name)}")
    result: dict[str, Any] = json.loads(out)
    return result


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    ok, wall = raw["ok"], raw["wall_s"] or float("nan")
    cpu = {k: v for k, v in raw["cpu_s"].items() if k != "engine"}
    return {"ok": ok, "errors": raw["errors"], "first_error": raw["first_error"],
            "rps": ok / wall, "tok_s": raw["tokens"] / wall,
            "ttft_p50": pct(raw["ttft_ms"], 50), "ttft_p99": pct(raw["ttft_ms"], 99),
            "total_p50": pct(raw["total_ms"], 50), "total_p99": pct(raw["total_ms"], 99),
            "cpu_ms_req": sum(cpu.values()) * 1000 / ok if ok else float("nan"),
            # Per token the engine sent (for a streamed answer, per SSE event relayed).
            "cpu_us_tok": sum(cpu.values()) * 1e6 / raw["tokens"] if raw["tokens"] else float("nan"),
            "cpu_ms_req_by": {k: v * 1000 / ok for k, v in cpu.items()} if ok else {},
            "engine_cpu_ms_req": raw["cpu_s"].get("engine", 0.0) * 1000 / ok if ok else float("nan")}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# Whose CPU is given as a ratio to vllm-router's, in the per-scenario tables and the summary.
RELATIVE = ("nebula", "nebula_asyncio", "nebula_uvloop", "proxy", "nginx", "proxy_uvloop")


def print_scenario(sc: Scenario, res: dict[str, dict[str, Any]], skipped: dict[str, str] | None = None
                   ) -> dict[str, float]:
    d, p, n = res["direct"], res["proxy"], res["nebula"]
    vr = res.get("vllm_router")
    timing = f"TTFT {sc.ttft_ms:g} ms, {sc.tpot_ms:g} ms/token" if sc.ttft_ms or sc.tpot_ms else "no delays"
    print(f"\n== {sc.name}: {'stream' if sc.stream else 'non-stream'}, {sc.tokens} tokens, {timing}, "
          f"concurrency {sc.concurrency} ==")
    print(f"{'target':<13}{'ok':>7}{'err':>5}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}"
          f"{'+p50':>8}{'+p99':>8}{'CPU ms/req':>12}{'CPU us/tok':>12}{'/vllm-router':>14}  by process")
    for target, r in res.items():
        by = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_req_by"].items())
        cpu = f"{r['cpu_ms_req']:.3f}" if target != "direct" else "-"
        # Per streamed token only: a non-streamed answer's tokens are one body, whatever their count.
        tok = f"{r['cpu_us_tok']:.2f}" if sc.stream and target != "direct" else "-"
        rel = f"{ratio(r['cpu_ms_req'], vr['cpu_ms_req']):.2f}x" if vr and target != "direct" else "-"
        print(f"{target:<13}{r['ok']:>7}{r['errors']:>5}{r['rps']:>9.1f}{r['tok_s']:>9.0f}{r['ttft_p50']:>10.2f}"
              f"{r['ttft_p99']:>8.2f}{r['ttft_p50'] - d['ttft_p50']:>8.2f}{r['ttft_p99'] - d['ttft_p99']:>8.2f}"
              f"{cpu:>12}{tok:>12}{rel:>14}  {by}")
        if r["first_error"]:
            print(f"              first error: {r['first_error'][:200]}")
    for target, why in (skipped or {}).items():
        print(f"{target:<13}skipped: {why}")
    ratios = {"cpu_nebula_over_proxy": ratio(n["cpu_ms_req"], p["cpu_ms_req"]),
              "tok_s_nebula_over_direct": ratio(n["tok_s"], d["tok_s"]),
              "tok_s_proxy_over_direct": ratio(p["tok_s"], d["tok_s"]),
              "added_ttft_p99_nebula_ms": n["ttft_p99"] - d["ttft_p99"],
              "added_ttft_p99_proxy_ms": p["ttft_p99"] - d["ttft_p99"]}
    if "proxy_uvloop" in res:
        ratios["cpu_proxy_uvloop_over_proxy"] = ratio(res["proxy_uvloop"]["cpu_ms_req"], p["cpu_ms_req"])
    for target in BASELINES:
        if target in res:
            ratios[f"added_ttft_p99_{target}_ms"] = res[target]["ttft_p99"] - d["ttft_p99"]
    relative = [t for t in RELATIVE if t in res] if vr is not None else []
    for target in relative:
        # Per request, and for a streamed answer per token: the two differ only if the targets' requests
        # carried different token counts (each request here streams the same number).
        ratios[f"cpu_{target}_over_vllm_router"] = ratio(res[target]["cpu_ms_req"], res["vllm_router"]["cpu_ms_req"])
        if sc.stream:
            ratios[f"cpu_tok_{target}_over_vllm_router"] = ratio(res[target]["cpu_us_tok"],
                                                                 res["vllm_router"]["cpu_us_tok"])
    print(f"ratios: CPU/req nebula/proxy {ratios['cpu_nebula_over_proxy']:.2f}x | tokens/s nebula/direct "
          f"{ratios['tok_s_nebula_over_direct']:.3f}x (proxy/direct {ratios['tok_s_proxy_over_direct']:.3f}x) | "
          f"added p99 TTFT nebula {ratios['added_ttft_p99_nebula_ms']:+.2f} ms "
          f"(proxy {ratios['added_ttft_p99_proxy_ms']:+.2f} ms"
          + "".join(f", {t} {ratios[f'added_ttft_p99_{t}_ms']:+.2f} ms" for t in BASELINES if t in res) + ")"
          + (f" | CPU/req proxy_uvloop/proxy {ratios['cpu_proxy_uvloop_over_proxy']:.2f}x"
             if "cpu_proxy_uvloop_over_proxy" in ratios else "")
          + (" | CPU/req over vllm-router: "
             + ", ".join(f"{t} {ratios[f'cpu_{t}_over_vllm_router']:.2f}x" for t in relative) if relative else ""))
    return ratios


def print_relative(chosen: Sequence[Scenario], results: dict[str, dict[str, dict[str, Any]]],
                   stack: Stack) -> None:
    """The issue-18 summary: per scenario, vllm-router's CPU per request (and per streamed token) and each
    other hop's as value (ratio to vllm-router's); with vllm-router skipped, the values alone."""
    cols = [t for t in RELATIVE if any(t in r for r in results.values()) or t in stack.skipped]
    print("\n== CPU per request and per streamed token, relative to vllm-router (issue 18) ==")
    print(f"{'scenario':<24}{'unit':<12}{'vllm-router':>12}" + "".join(f"{t:>20}" for t in cols))
    for sc in chosen:
        res = results.get(sc.name)
        if not res:
            continue
        units = [("ms/request", "cpu_ms_req")] + ([("us/token", "cpu_us_tok")] if sc.stream else [])
        for unit, key in units:
            vr = res["vllm_router"][key] if "vllm_router" in res else None
            cells = []
            for t in cols:
                if t not in res:
                    cells.append("skipped")
                    continue
                value = res[t][key]
                cells.append(f"{value:.3f} ({ratio(value, vr):.2f}x)" if vr is not None else f"{value:.3f} (-)")
            print(f"{sc.name:<24}{unit:<12}{f'{vr:.3f}' if vr is not None else 'skipped':>12}"
                  + "".join(f"{c:>20}" for c in cells))
    for target, label in stack.labels.items():
        print(f"{target}: {label}")
    for target, why in stack.skipped.items():
        print(f"{target} skipped: {why}")


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so the `finally` that stops the children always runs."""
    def handler(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="nebula-bench-"))
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir)
    py_spy = None
    if args.py_spy:
        if profile_dir is None:
            raise SystemExit("--py-spy needs --profile DIR for its output")
        py_spy = (args.py_spy, profile_dir)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    baselines_of(args.baselines)  # a misspelt name fails here, before anything starts
    results: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    with terminate_as_exit():
        try:
            stack = start_stack(procs, workdir, profile_dir, Path(args.nebula_src or ROOT).resolve(), bool(py_spy),
                                args.uvloop_proxy, args.gateway_workers, args.gateway_event_loop,
                                args.compare_event_loops)
            start_baselines(procs, stack, workdir, args)
            print(f"stack up in {time.monotonic() - started:.1f} s (logs in {workdir}); "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
            if stack.labels:
                print(f"baselines: {describe_baselines(stack)}", flush=True)
            # The baselines right after Nebula, then any other optional target (the uvloop proxy).
            targets = [*TARGETS, *(t for t in BASELINES if t in stack.extra_url),
                       *(t for t in stack.extra_url if t not in BASELINES)]
            for sc in chosen:
                res = {t: summarize(run_load(procs, stack, t, sc, args.scale, py_spy)) for t in targets}
                results[sc.name] = res
                ratios[sc.name] = print_scenario(sc, res, stack.skipped)
                sys.stdout.flush()
            if stack.labels or stack.skipped:
                print_relative(chosen, results, stack)
            if stack.labels:
                # Thread pools may grow under load: what the figures above covered at the end.
                print(f"at the end: {describe_baselines(stack)}")
        finally:
            procs.stop_all()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    goals = goals_of(ratios)
    print("\n== goals (issue 3) ==")
    for name, (value, target, met) in goals.items():
        print(f"{name:<46}{value:>10.3f}  goal {target:<8}{'MET' if met else 'NOT MET'}")
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    summary = {"scenarios": {k: {t: {m: v for m, v in r.items() if m != "first_error"} for t, r in res.items()}
                             for k, res in results.items()},
               "baselines": stack.labels, "skipped": stack.skipped, "ratios": ratios,
               "goals": {k: {"value": v, "goal": g, "met": m} for k, (v, g, m) in goals.items()}}
    print("JSON " + json.dumps(summary, sort_keys=True))
    return 0


def goals_of(ratios: dict[str, dict[str, float]]) -> dict[str, tuple[float, str, bool]]:
    out: dict[str, tuple[float, str, bool]] = {}
    cpu = [r["cpu_nebula_over_proxy"] for r in ratios.values()]
    if cpu:
        out["CPU/req nebula/proxy (worst scenario)"] = (max(cpu), "<= 1.0", max(cpu) <= 1.0)
    for name in ("stream32_c64", "nonstream32_c64"):
        if name in ratios:
            v = ratios[name]["added_ttft_p99_nebula_ms"]
            out[f"added p99 TTFT ms, {name}"] = (v, "<= 2 ms", v <= 2.0)
    if "realistic_c128" in ratios:
        v = ratios["realistic_c128"]["tok_s_nebula_over_direct"]
        out["tokens/s nebula/direct, realistic_c128"] = (v, ">= 0.97", v >= 0.97)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the whole benchmark (the default)")
    for q in (p, run):
        q.add_argument("--scale", type=float, default=1.0, help="multiply every measurement's length")
        q.add_argument("--only", default="", help="comma-separated scenario names")
        q.add_argument("--profile", default="", metavar="DIR",
                       help="write profiles to DIR: cProfile of the Nebula services (DIR/*.pstats), or with "
                       "--py-spy, sampled stacks of each hop per scenario (DIR/<scenario>-<process>.txt)")
        q.add_argument("--py-spy", default="", metavar="BIN",
                       help="py-spy binary (e.g. uv pip install --target /tmp/pyspy py-spy) to sample the hops "
                       "instead of cProfile")
        q.add_argument("--uvloop-proxy", action="store_true",
                       help="also measure the minimal proxy on uvloop (uvloop must be importable: "
                       "uv pip install --target /tmp/deps uvloop; PYTHONPATH=/tmp/deps)")
        q.add_argument("--gateway-workers", type=int, default=1, metavar="N",
                       help="run the gateway with gateway.workers = N (CPU counts the supervisor and its workers)")
        q.add_argument("--compare-event-loops", action="store_true",
                       help="also measure a second gateway on the other event loop (target nebula_asyncio, or "
                       "nebula_uvloop with --gateway-event-loop asyncio), in the same run")
        q.add_argument("--gateway-event-loop", choices=("asyncio", "uvloop"), default="uvloop",
                       help="the gateway's gateway.event_loop (compare with --uvloop-proxy for the proxy's)")
        q.add_argument("--baselines", default="vllm-router,nginx", metavar="LIST",
                       help="the external proxies to measure too, comma-separated (default: %(default)s; '' for "
                       "none); one not installed is skipped with the reason")
        q.add_argument("--vllm-router", default="", metavar="PATH",
                       help="the vllm-router launcher, or a venv holding it (default: "
                       f"{bench_baselines.VLLM_ROUTER_VENV}/bin/vllm-router, else vllm-router on PATH); to install "
                       f"it: {bench_baselines.VLLM_ROUTER_INSTALL}")
        q.add_argument("--vllm-router-threads", type=int, default=1, metavar="N",
                       help="vllm-router's tokio worker threads (TOKIO_WORKER_THREADS; default 1, as the gateway and "
                       "the proxy have one event loop and nginx one worker)")
        q.add_argument("--nginx", default="", metavar="PATH",
                       help="the nginx binary (default: nginx on PATH or /usr/sbin/nginx; to install it: "
                       f"{bench_baselines.NGINX_INSTALL})")
        q.add_argument("--keep", action="store_true", help="keep the work dir (logs, etcd data)")
        q.add_argument("--nebula-src", default="", metavar="DIR",
                       help="run Nebula's services from this tree (default: this checkout), e.g. "
                       "mkdir /tmp/head && git archive HEAD | tar -x -C /tmp/head")
    e = sub.add_parser("engine", help="(internal) the engine simulator")
    e.add_argument("--port", type=int, required=True)
    x = sub.add_parser("proxy", help="(internal) the minimal reverse proxy")
    x.add_argument("--port", type=int, required=True)
    x.add_argument("--upstream", required=True)
    x.add_argument("--uvloop", action="store_true")
    lg = sub.add_parser("loadgen", help="(internal) one measurement; prints JSON")
    lg.add_argument("--url", required=True)
    lg.add_argument("--concurrency", type=int, required=True)
    lg.add_argument("--duration-s", type=float, required=True)
    lg.add_argument("--stream", action="store_true")
    lg.add_argument("--tokens", type=int, default=32)
    lg.add_argument("--ttft-ms", type=float, default=0.0)
    lg.add_argument("--tpot-ms", type=float, default=0.0)
    lg.add_argument("--prompt-bytes", type=int, default=2000)
    lg.add_argument("--warmup-s", type=float, default=1.0)
    lg.add_argument("--request-timeout-s", type=float, default=60.0)
    lg.add_argument("--key", default="")
    lg.add_argument("--api", choices=sorted(PATHS), default="chat")
    lg.add_argument("--pids", default="", help="name=pid,... whose CPU time to measure")
    sv = sub.add_parser("service", help="(internal) a Nebula service under cProfile")
    sv.add_argument("service", choices=["gateway", "router"])
    sv.add_argument("--out", required=True)
    ps = sub.add_parser("profile-summary", help="summarize py-spy raw profiles written by --py-spy")
    ps.add_argument("files", nargs="+", type=Path)
    ps.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    if args.role == "engine":
        serve(engine_app(), args.port)
    elif args.role == "proxy":
        serve(proxy_app(args.upstream), args.port, use_uvloop=args.uvloop)
    elif args.role == "loadgen":
        loadgen_main(args)
    elif args.role == "service":
        service_main(args)
    elif args.role == "profile-summary":
        for f in args.files:
            profile_summary(f, args.top)
    else:
        return orchestrate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
