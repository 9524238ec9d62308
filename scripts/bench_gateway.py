#!/usr/bin/env python3
"""Benchmark of Nebula's data path against a bare single-hop reverse proxy (issue 3, "Speed") and the Rust
routers (issue 18).

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
    .venv/bin/python scripts/bench_gateway.py --rounds 3      # each target 3 times, pooled, and its spread
    .venv/bin/python scripts/bench_gateway.py --profile DIR   # the gateway under cProfile -> DIR/*.pstats
    .venv/bin/python scripts/bench_gateway.py --profile DIR --py-spy /tmp/pyspy/bin/py-spy   # sampled, per hop
    .venv/bin/python scripts/bench_gateway.py profile-summary DIR/stream32_c64-gateway.txt
    .venv/bin/python scripts/bench_gateway.py --nebula-src /tmp/head   # services from another tree
    .venv/bin/python scripts/bench_gateway.py --compare-src /tmp/head  # and a gateway from it beside this one's
    .venv/bin/python scripts/bench_gateway.py --gateway-workers 4      # the gateway as 4 processes on its port
    .venv/bin/python scripts/bench_gateway.py --syscalls     # and each hop's system calls per request (perf)
    .venv/bin/python scripts/bench_gateway.py --uvloop-proxy          # the proxy on uvloop too, same run
    .venv/bin/python scripts/bench_gateway.py --tcp-relay             # and a byte relay: a Python floor
    .venv/bin/python scripts/bench_gateway.py --compare-event-loops   # a second gateway on asyncio's loop
    .venv/bin/python scripts/bench_gateway.py --vllm-router /opt/vr/bin/vllm-router --nginx /usr/sbin/nginx
    .venv/bin/python scripts/bench_gateway.py --baselines ''          # without vllm-router and nginx

A change is best measured with --compare-src: the spread between runs on a shared box is as wide as most
changes. Two gateways in one run (target nebula_ref), each measured twice in the order A B ... B A and
pooled, share the box's drift; repeat the run and swap the trees (--nebula-src) before trusting a few percent.

The modules: bench_engine.py (engine simulator, proxy), bench_load.py (scenarios, load generator),
bench_stack.py (the processes of a run), bench_report.py (tables, goals, profile summary),
bench_baselines.py (vllm-router, nginx). This file runs them: each role is a subcommand of it.

The engine's timing travels in the request body (`bench_ttft_ms`, `bench_tpot_ms`, `max_tokens`): Nebula
forwards unknown fields unchanged, so one engine process serves every scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The repository root, so `import nebula` works however the script is started; BENCH_NEBULA_SRC (set by
# --nebula-src for the services it starts) points at another tree, e.g. an export of a commit.
ROOT = Path(__file__).resolve().parent.parent
SRC = Path(os.environ.get("BENCH_NEBULA_SRC") or ROOT).resolve()
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# This file's directory is sys.path[0]: its sibling modules import as top-level ones.
import bench_baselines  # noqa: E402
from bench_engine import PATHS, engine_app, proxy_app, serve  # noqa: E402
from bench_load import SCENARIOS, Scenario, loadgen_main, pooled, process_tree  # noqa: E402
from bench_relay import serve_relay  # noqa: E402
from bench_report import (  # noqa: E402
    goals_of,
    print_relative,
    print_rounds,
    print_scenario,
    profile_summary,
    summarize,
)
from bench_stack import (  # noqa: E402
    API_KEY,
    BASELINES,
    ENTRY,
    Processes,
    Stack,
    StackOptions,
    baselines_of,
    describe_baselines,
    start_baselines,
    start_stack,
)

TARGETS = ("direct", "proxy", "nebula")


def read_syscall_counts(perf_csv: str) -> dict[str, int]:
    """System calls by name from `perf stat -x, -e 'syscalls:sys_enter_*'` output; those never made left out."""
    counts: dict[str, int] = {}
    for line in perf_csv.splitlines():
        value, _, rest = line.partition(",")
        event = rest.partition(",")[2].partition(",")[0]
        if event.startswith("syscalls:sys_enter_") and value.isdigit() and int(value):
            counts[event.removeprefix("syscalls:sys_enter_")] = int(value)
    return counts


def profile_path(out_dir: Path, scenario: str, process: str, nth: int) -> Path:
    """Where py-spy writes a process's profile over one measurement: the `nth` (from 0) of its target in the
    scenario, since --rounds and --compare-src measure a target more than once."""
    return out_dir / f"{scenario}-{process}{f'-{nth + 1}' if nth else ''}.txt"


def run_load(procs: Processes, stack: Stack, target: str, sc: Scenario, scale: float,
             py_spy: tuple[str, Path] | None = None, count_syscalls: bool = False, nth: int = 0) -> dict[str, Any]:
    base = ({"direct": stack.engine_url, "proxy": stack.proxy_url, "nebula": stack.gateway_url}
            | stack.extra_url)[target]
    pids = dict(stack.pids[target]) | stack.pids["_engine"]
    duration = sc.duration_s * scale
    argv = [sys.executable, str(ENTRY), "loadgen", "--url", base + PATHS[sc.api], "--api", sc.api,
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
            profile = profile_path(py_spy[1], sc.name, pname, nth)
            procs.start(spies[-1], [
                py_spy[0], "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--format", "raw",
                "--duration", str(int(sc.warmup_s + duration + 1)), "-o", str(profile)])
    counting = count_syscalls and target != "direct"
    counted = procs.workdir / f"syscalls-{sc.name}-{target}.csv"
    if counting:
        # The hop's processes over the measured window only: from the end of the warm-up, for its length.
        spies.append(f"perf-{sc.name}-{target}")
        hop = ",".join(str(p) for pid in stack.pids[target].values() for p in process_tree(pid))
        procs.start(spies[-1], ["sh", "-c", f"sleep {sc.warmup_s}; exec perf stat -x, -e 'syscalls:sys_enter_*' "
                                            f"-p {hop} -o {counted} -- sleep {duration}"])
    try:
        out, _ = proc.communicate(timeout=sc.warmup_s + duration + 90)
        for spy in spies:
            procs.procs[spy].wait(30)  # it stops by itself after its duration, then writes its file
    finally:
        for n in [name, *spies]:
            procs.stop(n)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{procs.log_tail(name)}")
    result: dict[str, Any] = json.loads(out)
    if counting:
        if not counted.is_file():
            raise RuntimeError(f"perf wrote no counts for {target}:\n{procs.log_tail(spies[-1])}")
        result["syscalls"] = read_syscall_counts(counted.read_text())
    return result


def measuring_order(targets: Sequence[str], rounds: int = 1) -> list[str]:
    """The order one scenario measures its targets in. With --compare-src, nebula (A) and nebula_ref (B) are
    measured twice, A B first and B A last with the other targets between, so that both centre on the same
    moment and a steady drift in the box's speed over the scenario (other work, clocks) weighs on both alike.
    With --rounds N the whole order runs N times, every other time backwards, for the same reason."""
    order = list(targets)
    if "nebula_ref" in targets:
        order.remove("nebula_ref")
        order.insert(order.index("nebula") + 1, "nebula_ref")
        order += ["nebula_ref", "nebula"]
    return [t for r in range(rounds) for t in (order if r % 2 == 0 else order[::-1])]


def measure(procs: Processes, stack: Stack, targets: Sequence[str], sc: Scenario, scale: float,
            py_spy: tuple[str, Path] | None, count_syscalls: bool = False, rounds: int = 1
            ) -> dict[str, list[dict[str, Any]]]:
    """One scenario's raw results: each target's measurements, in the order measuring_order gives."""
    raws: dict[str, list[dict[str, Any]]] = {}
    for target in measuring_order(targets, rounds):
        done = raws.setdefault(target, [])
        done.append(run_load(procs, stack, target, sc, scale, py_spy, count_syscalls, nth=len(done)))
    return raws


def service_main(args: argparse.Namespace) -> None:
    import cProfile

    from nebula.cli.main import main

    prof = cProfile.Profile()
    try:
        prof.runcall(main, [args.service, "run"])  # returns on SIGTERM: the service shuts down in order
    finally:
        prof.dump_stats(args.out)



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
    if args.syscalls and shutil.which("perf") is None:
        raise SystemExit("--syscalls needs perf on PATH (apt-get install linux-perf), and root for its syscall "
                         "tracepoints")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: give 1 or more")
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    baselines_of(args.baselines)  # a misspelt name fails here, before anything starts
    results: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    with terminate_as_exit():
        try:
            stack = start_stack(procs, workdir, StackOptions(
                src=Path(args.nebula_src or ROOT).resolve(), profile_dir=profile_dir, sampled=bool(py_spy),
                uvloop_proxy=args.uvloop_proxy, tcp_relay=args.tcp_relay, gateway_workers=args.gateway_workers,
                gateway_loop=args.gateway_event_loop, compare_loops=args.compare_event_loops,
                compare_src=Path(args.compare_src).resolve() if args.compare_src else None))
            start_baselines(procs, stack, workdir, args)
            print(f"stack up in {time.monotonic() - started:.1f} s (logs in {workdir}); "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
            if stack.labels:
                print(f"baselines: {describe_baselines(stack)}", flush=True)
            # The baselines right after Nebula, then any other optional target (the uvloop proxy).
            targets = [*TARGETS, *(t for t in BASELINES if t in stack.extra_url),
                       *(t for t in stack.extra_url if t not in BASELINES)]
            for sc in chosen:
                raws = measure(procs, stack, targets, sc, args.scale, py_spy, args.syscalls, args.rounds)
                res = {t: summarize(pooled(raws[t])) for t in targets}
                results[sc.name] = res
                ratios[sc.name] = print_scenario(sc, res, stack.skipped)
                print_rounds(sc, raws, args.rounds)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the whole benchmark (the default)")
    for q in (p, run):
        q.add_argument("--scale", type=float, default=1.0, help="multiply every measurement's length")
        q.add_argument("--only", default="", help="comma-separated scenario names")
        q.add_argument("--rounds", type=int, default=1, metavar="N",
                       help="measure every target N times per scenario (every other round backwards), pooled; "
                       "the ratio to vllm-router of each round is printed too")
        q.add_argument("--profile", default="", metavar="DIR",
                       help="write profiles to DIR: cProfile of the Nebula services (DIR/*.pstats), or with "
                       "--py-spy, sampled stacks of each hop per scenario (DIR/<scenario>-<process>.txt, then -2.txt "
                       "for its second measurement)")
        q.add_argument("--py-spy", default="", metavar="BIN",
                       help="py-spy binary (e.g. uv pip install --target /tmp/pyspy py-spy) to sample the hops "
                       "instead of cProfile")
        q.add_argument("--syscalls", action="store_true",
                       help="also count each hop's system calls per request over the measured window (perf stat "
                       "on the syscall tracepoints; the counting costs CPU, so this run's CPU figures are not for "
                       "comparison)")
        q.add_argument("--tcp-relay", action="store_true",
                       help="also measure a byte relay on uvloop (target tcp_relay; scripts/bench_relay.py): the "
                       "floor of any Python data plane")
        q.add_argument("--uvloop-proxy", action="store_true",
                       help="also measure the minimal proxy on uvloop (target proxy_uvloop)")
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
        q.add_argument("--compare-src", default="", metavar="DIR",
                       help="also measure a gateway run from this tree (target nebula_ref), with the same config, "
                       "in the same run: a change against the commit before it, e.g. mkdir /tmp/base && git archive "
                       "HEAD~1 | tar -x -C /tmp/base")
    e = sub.add_parser("engine", help="(internal) the engine simulator")
    e.add_argument("--port", type=int, required=True)
    x = sub.add_parser("proxy", help="(internal) the minimal reverse proxy")
    x.add_argument("--port", type=int, required=True)
    x.add_argument("--upstream", required=True)
    x.add_argument("--uvloop", action="store_true")
    rl = sub.add_parser("relay", help="(internal) the byte relay")
    rl.add_argument("--port", type=int, required=True)
    rl.add_argument("--upstream-host", required=True)
    rl.add_argument("--upstream-port", type=int, required=True)
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
    elif args.role == "relay":
        serve_relay(args.port, args.upstream_host, args.upstream_port)
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
