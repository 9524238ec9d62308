#!/usr/bin/env python3
"""How one gateway's requests/s scale with `gateway.workers` (issue 18): the gateway at 1, 2, 4, ... worker
processes on one port, each count measured at the highest rate it sustains, so that the figure is the
gateway's and not the client's or the engine's.

What runs, each in its own process, on loopback:
  - wrk (C, Debian's `wrk`) as the client: non-streamed chat completions with the inference key, as fast as
    its connections are answered (a closed loop at --connections, default 32 per worker of the largest count
    and at least 64, so that each worker has requests queued while the engine answers the others; --threads,
    default one per 4 CPUs);
  - a canned engine: every POST answered with the same chat completion, at once (uvloop and httptools: 7-15 us
    of CPU per request against the gateway's 40-60; the table prints its figure, and wrk's, to show which
    process is the limit), in --engine-procs processes on one port (default: one per 6 CPUs, since a single
    one would cap 8 workers at its 70-130k requests/s);
  - etcd and Nebula's gateway with the canned engine registered as the model's READY replica, started again
    for each worker count with `gateway.workers = N`.
A first row ("direct", wrk straight at the engine) is the ceiling without the gateway.

    .venv/bin/python scripts/bench_workers.py                      # 1, 2, 4, 8 workers, up to the cores there are
    .venv/bin/python scripts/bench_workers.py --workers 1,2,4 --duration-s 20 --connections 128
    .venv/bin/python scripts/bench_workers.py --nebula-src /tmp/cmp  # the gateway from another tree (compiled)
    scripts/bench-workers-kit.sh DIR [ARGS]                         # on a machine with none of this installed

Scaling needs the cores to scale into: the gateway's N workers, the engine and wrk share the machine, so a
count is only worth measuring where N plus about one core (engine and wrk) fit; on 2 cores the second worker
competes with them, and the figure says so (the gateway's cores used, beside each worker's share).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools
import uvloop

# The repository root, so that `import nebula` works however the script is started (the gateway itself runs
# from --nebula-src's tree when given).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# This file's directory is sys.path[0]: its sibling modules import as top-level ones.
import bench_load  # noqa: E402
import bench_stack  # noqa: E402
from bench_engine import HOST, MODEL, PATH  # noqa: E402
from bench_stack import AUTH, PROBE, Processes, free_port, http_ok, wait_until  # noqa: E402

from tests.harness.ports import listening  # noqa: E402

WRK_INSTALL = "apt-get install -y wrk"
ETCD_INSTALL = "apt-get install -y etcd-server"
# What the canned engine answers every POST with: a chat completion of 32 tokens, as vLLM writes one.
_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * 32}, "logprobs": None,
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 32, "total_tokens": 42}}, separators=(",", ":")).encode()
_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_COMPLETION)
       + _COMPLETION)
_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


# ---------------------------------------------------------------------------------------------------------
# The canned engine (role `canned-engine`)
# ---------------------------------------------------------------------------------------------------------

class _CannedConnection(asyncio.Protocol):
    """One engine connection: httptools frames the requests (pipelined ones too), each answered at once."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._path = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._path = url

    def on_message_complete(self) -> None:
        if self._transport is None:
            return
        method = self._parser.get_method()
        if method == b"POST":
            self._transport.write(_OK)
        else:
            self._transport.write(_HEALTH if self._path == b"/health" else _NOT_FOUND)


def canned_engine_main(port: int) -> None:
    async def serve() -> None:
        # reuse_port: --engine-procs of these share the port, the kernel spreading connections over them.
        server = await asyncio.get_running_loop().create_server(_CannedConnection, HOST, port, reuse_address=True,
                                                                reuse_port=True)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


# ---------------------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------------------

def wrk_script(key: str) -> str:
    """wrk's Lua: POST the chat request with the key, and print its summary as one JSON line at the end."""
    body = json.dumps({"model": MODEL, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Say hello " * 20}]}, separators=(",", ":"))
    return f"""wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d}}\\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def parse_wrk(output: str) -> dict[str, Any]:
    """The JSON line wrk_script's `done` prints; ValueError (with wrk's output) when there is none."""
    for line in output.splitlines():
        if line.startswith("WRK {"):
            return dict(json.loads(line.removeprefix("WRK ")))
    raise ValueError(f"wrk printed no summary:\n{output[-2000:]}")


def default_counts(cores: int) -> list[int]:
    """1, 2, 4, 8 workers, those with a core each (the engine and wrk share what is left)."""
    return [n for n in (1, 2, 4, 8) if n == 1 or n <= cores]


def default_load(cores: int, counts: list[int]) -> tuple[int, int, int]:
    """(wrk's threads, wrk's connections, engine processes) where the command line names none: on 16 CPUs 4
    threads and 2 engines beside 8 workers (14 cores, each client thread and engine good for about twice what
    a worker serves), 256 connections."""
    return max(1, cores // 4), max(64, 32 * max(counts)), max(1, cores // 6)


# ---------------------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------------------

def run_wrk(wrk: str, url: str, script: Path, args: argparse.Namespace, duration_s: float
            ) -> tuple[dict[str, Any], float]:
    """wrk against `url` for `duration_s`: its summary, and its own CPU seconds."""
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{max(1, round(duration_s))}s",
            "-s", str(script), url + PATH]
    # Its CPU: what the children this script reaped used, across the run (the services it started are reaped
    # only when stopped, outside any run).
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration_s + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    text = proc.stdout.decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"wrk exited {proc.returncode}:\n{text[-2000:]}")
    return parse_wrk(text), cpu


def measure(wrk: str, url: str, script: Path, args: argparse.Namespace, gateway_pid: int | None,
            engine_pids: list[int]) -> dict[str, Any]:
    """A warm-up, then the measured run: rate, latency, errors, and the CPU of each process it crossed."""
    run_wrk(wrk, url, script, args, args.warmup_s)
    workers = bench_load.process_tree(gateway_pid)[1:] if gateway_pid is not None else []
    before = {pid: sum(bench_load.cpu_times(pid)) for pid in [*engine_pids, *workers]}
    gw_before = sum(bench_load.cpu_times(gateway_pid)) if gateway_pid is not None else 0.0
    t0 = time.monotonic()
    summary, wrk_cpu = run_wrk(wrk, url, script, args, args.duration_s)
    wall = time.monotonic() - t0
    gw_cpu = sum(bench_load.cpu_times(gateway_pid)) - gw_before if gateway_pid is not None else 0.0
    used = {pid: sum(bench_load.cpu_times(pid)) - cpu for pid, cpu in before.items()}
    n = max(1, summary["requests"])
    rate = summary["requests"] / (summary["duration_us"] / 1e6)
    return {
        "rps": rate, "requests": summary["requests"], "errors": summary["non2xx"] + summary["socket_errors"],
        "p50_ms": summary["p50_us"] / 1000, "p99_ms": summary["p99_us"] / 1000,
        "gateway_us_req": gw_cpu / n * 1e6, "gateway_cores": gw_cpu / wall,
        "worker_shares": [used[pid] / gw_cpu if gw_cpu > 0 else 0.0 for pid in workers],
        "engine_us_req": sum(used[pid] for pid in engine_pids) / n * 1e6, "wrk_us_req": wrk_cpu / n * 1e6,
    }


def print_row(label: str, res: dict[str, Any], base_rps: float | None) -> None:
    scale = f"{res['rps'] / base_rps:5.2f}x" if base_rps else "     -"
    shares = " ".join(f"{s:.0%}" for s in res["worker_shares"]) or "-"
    gw = f"{res['gateway_us_req']:9.1f} {res['gateway_cores']:7.2f}" if label != "direct" else f"{'-':>9} {'-':>7}"
    print(f"{label:<8} {res['rps']:9.0f} {scale} {gw}  {shares:<32} {res['engine_us_req']:7.1f} "
          f"{res['wrk_us_req']:6.1f} {res['p50_ms']:7.2f} {res['p99_ms']:7.2f} {res['errors']:6d}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

def start_gateway(procs: Processes, workdir: Path, etcd_url: str, workers: int, src: Path) -> tuple[int, str]:
    """A gateway of `workers` processes; (its main pid, its URL) once every worker listens and a request
    crosses it to the engine."""
    port = free_port()
    name = f"gateway_{workers}"
    env = bench_stack.from_tree(bench_stack.gateway_env(workdir, etcd_url, port, workers), src)
    proc = procs.start(name, [sys.executable, "-m", "nebula", "gateway", "run"], env=env, cwd=src)
    url = f"http://{HOST}:{port}"
    # The kernel spreads connections (SO_REUSEPORT) only over the listeners there are when they connect.
    wait_until(lambda: len(listening(port)) >= workers, 60, f"{workers} listening workers", procs, name)
    wait_until(lambda: http_ok(url + PATH, PROBE, AUTH), 30, "a request through the gateway", procs, name)
    return proc.pid, url


def main(args: argparse.Namespace) -> int:
    wrk = args.wrk or shutil.which("wrk")
    if not wrk or not os.access(wrk, os.X_OK):
        print(f"bench_workers: wrk not found{f' at {args.wrk}' if args.wrk else ''}; to install it: {WRK_INSTALL}",
              file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    counts = [int(n) for n in args.workers.split(",")] if args.workers else default_counts(cores)
    if not counts or min(counts) < 1:
        print("bench_workers: --workers takes counts of 1 or more, e.g. 1,2,4", file=sys.stderr)
        return 2
    threads, connections, engine_procs = default_load(cores, counts)
    args.threads, args.connections = args.threads or threads, args.connections or connections
    args.engine_procs = args.engine_procs or engine_procs
    if min(args.threads, args.connections, args.engine_procs) < 1:
        print("bench_workers: --threads, --connections and --engine-procs take 1 or more", file=sys.stderr)
        return 2
    etcd = shutil.which("etcd")
    if etcd is None:
        print(f"bench_workers: etcd not found; to install it: {ETCD_INSTALL}", file=sys.stderr)
        return 2
    src = Path(args.nebula_src).resolve() if args.nebula_src else ROOT
    workdir = Path(tempfile.mkdtemp(prefix="nebula-bench-workers-"))
    procs = Processes(workdir)
    results: dict[str, dict[str, Any]] = {}
    try:
        port = free_port()
        engine_url = f"http://{HOST}:{port}"
        engines = [procs.start(f"engine_{i}", [sys.executable, __file__, "canned-engine", "--port", str(port)])
                   for i in range(args.engine_procs)]
        wait_until(lambda: len(listening(port)) >= len(engines), 20, "the canned engines", procs, "engine_0")
        engine_pids = [e.pid for e in engines]
        etcd_url = bench_stack.start_etcd(procs, workdir, etcd)  # the one the header names
        bench_stack.register_engine(etcd_url, engine_url)
        (workdir / "direct.lua").write_text(wrk_script(""))
        (workdir / "gateway.lua").write_text(wrk_script(bench_stack.API_KEY))
        print(f"{cores} CPUs; wrk -t{args.threads} -c{args.connections}, {args.duration_s:g} s per count "
              f"after {args.warmup_s:g} s of warm-up; {len(engines)} engine process(es); gateway from {src} on "
              f"Python {sys.version.split()[0]} (logs in {workdir}); wrk {wrk}, etcd {etcd}")
        print(f"{'workers':<8} {'req/s':>9} {'x 1':>6} {'gw us/req':>9} {'gw CPUs':>7}  {'share per worker':<32} "
              f"{'eng us':>7} {'wrk us':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}", flush=True)
        results["direct"] = measure(wrk, engine_url, workdir / "direct.lua", args, None, engine_pids)
        print_row("direct", results["direct"], None)
        for n in counts:
            pid, url = start_gateway(procs, workdir, etcd_url, n, src)
            res = results[str(n)] = measure(wrk, url, workdir / "gateway.lua", args, pid, engine_pids)
            print_row(str(n), res, results[str(counts[0])]["rps"] if str(counts[0]) in results else None)
            procs.stop(f"gateway_{n}")
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    errors = sum(r["errors"] for r in results.values())
    print("JSON " + json.dumps({"cores": cores, "connections": args.connections, "results": results}))
    if errors:
        print(f"bench_workers: {errors} requests failed (non-2xx or socket errors): the figures do not count",
              file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    e = sub.add_parser("canned-engine", help="(internal) the canned engine")
    e.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", default="", metavar="N,N,...", help="worker counts (default: 1, 2, 4, 8 up to "
                   "the CPUs there are)")
    p.add_argument("--connections", type=int, default=0, help="wrk's connections (concurrent requests; default "
                   "32 per worker of the largest count, at least 64)")
    p.add_argument("--threads", type=int, default=0, help="wrk's threads (default one per 4 CPUs)")
    p.add_argument("--duration-s", type=float, default=10.0, help="each measured run (whole seconds)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="the warm-up before each (whole seconds)")
    p.add_argument("--engine-procs", type=int, default=0,
                   help="canned engine processes on the one port (default one per 6 CPUs)")
    p.add_argument("--wrk", default="", metavar="PATH", help="the wrk binary (default: the one on PATH)")
    p.add_argument("--nebula-src", default="", metavar="DIR", help="run the gateway from this tree")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, etcd data)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.role == "canned-engine":
        canned_engine_main(parsed.port)
    else:
        sys.exit(main(parsed))
