"""The load generator of scripts/bench_gateway.py (its `loadgen` role, one process per measurement): a closed
loop of requests at a fixed concurrency, recorded over a steady-state window, with the CPU time of the
processes the requests cross read from /proc at the window's edges; and `cpu_times`, that reading."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from bench_engine import MESSAGE_STOP, MODEL

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (nginx's worker, the gateway's workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:
        kids = []
    return [pid, *(p for kid in kids for p in process_tree(kid))]


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system (kernel) seconds of `pid` (all its threads) and of its live child processes (gateway
    workers): the system part is the hop's share of loopback TCP, cut only by making fewer system calls."""
    user = system = 0.0
    for each in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{each}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
            user += int(rest[11]) / CLK_TCK
            system += int(rest[12]) / CLK_TCK
    return user, system


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
    cpu_system_s: dict[str, float] = field(default_factory=dict)  # the kernel's part of cpu_s


def pooled(raws: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several measurements of one target as one (loadgen's JSON): counts, times and CPU added up."""
    out = dict(raws[0])
    for raw in raws[1:]:
        for key in ("ok", "errors", "wall_s", "tokens"):
            out[key] += raw[key]
        out["ttft_ms"] = out["ttft_ms"] + raw["ttft_ms"]
        out["total_ms"] = out["total_ms"] + raw["total_ms"]
        for cpu in ("cpu_s", "cpu_system_s"):
            mine, theirs = out.get(cpu, {}), raw.get(cpu, {})
            out[cpu] = {k: mine.get(k, 0.0) + theirs.get(k, 0.0) for k in mine.keys() | theirs.keys()}
        out["first_error"] = out["first_error"] or raw["first_error"]
        if "syscalls" in out:
            out["syscalls"] = {k: out["syscalls"].get(k, 0) + raw["syscalls"].get(k, 0)
                               for k in out["syscalls"].keys() | raw["syscalls"].keys()}
    return out


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
            cpu0 = {name: cpu_times(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            window.recording = True
            await asyncio.sleep(args.duration_s)
            window.recording = False
            res.wall_s = time.perf_counter() - t0
            cpu1 = {name: cpu_times(pid) for name, pid in pids.items()}
            res.cpu_s = {name: sum(cpu1[name]) - sum(cpu0[name]) for name in pids}
            res.cpu_system_s = {name: cpu1[name][1] - cpu0[name][1] for name in pids}
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
