#!/usr/bin/env python3
"""What per-key limits cost a request: a gateway worker's own limiter (core/limits.Limiter) against the table
the workers of one gateway share (adapters/shared_limits.SharedLimiter), alone and with other processes
hammering the same key at the same time. One run, interleaved rounds, the median of each; the figures that
matter are the ratios.

    .venv/bin/python scripts/bench_limits.py                 # ~10 s on 2 cores
    .venv/bin/python scripts/bench_limits.py --contenders 3 --iterations 200000

Each measured iteration is one request's worth of limiter work: admit (a key with both a rate and a
concurrency limit) then release.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nebula.adapters.shared_limits import SharedLimiter, SharedTable  # noqa: E402
from nebula.core.apikeys import KeyLimits  # noqa: E402
from nebula.core.limits import KeyLimiter, Limiter  # noqa: E402

KEY = "bench0123456789a"
# A bucket that never runs dry during the run, and room for every contender's request in flight.
LIMITS = KeyLimits(requests_per_minute=10**12, max_concurrent=10**6)

CONTENDER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from nebula.adapters.shared_limits import SharedLimiter, SharedTable
from nebula.core.apikeys import KeyLimits
limiter = SharedLimiter(SharedTable(int(sys.argv[1])), int(sys.argv[2]), time.monotonic)
limits = KeyLimits(requests_per_minute=10**12, max_concurrent=10**6)
print("ready", flush=True)
while True:
    for _ in range(1000):
        limiter.admit(sys.argv[4], limits)
        limiter.release(sys.argv[4])
"""


def per_request_us(limiter: KeyLimiter, iterations: int) -> float:
    admit, release = limiter.admit, limiter.release
    t0 = time.perf_counter()
    for _ in range(iterations):
        admit(KEY, LIMITS)
        release(KEY)
    return (time.perf_counter() - t0) / iterations * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100_000, help="admit+release pairs per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per variant (interleaved)")
    ap.add_argument("--contenders", type=int, default=1, help="other processes on the same key, contended variant")
    args = ap.parse_args()

    table = SharedTable.create(args.contenders + 1)
    local: KeyLimiter = Limiter(time.monotonic)
    shared: KeyLimiter = SharedLimiter(table, 0, time.monotonic)
    variants: dict[str, Callable[[], float]] = {
        "local (one worker's own)": lambda: per_request_us(local, args.iterations),
        "shared, uncontended": lambda: per_request_us(shared, args.iterations),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    results[f"shared, {args.contenders} other process(es) on the key"] = []
    for _ in range(args.rounds):
        for name, run in variants.items():
            results[name].append(run())
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(table.fd), str(i + 1), str(ROOT), KEY],
                                  pass_fds=(table.fd,), stdout=subprocess.PIPE, text=True)
                 for i in range(args.contenders)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            results[f"shared, {args.contenders} other process(es) on the key"].append(
                per_request_us(shared, args.iterations))
        finally:
            for p in procs:
                p.kill()
                p.wait()
                table.clear_worker(procs.index(p) + 1)
    base = statistics.median(results["local (one worker's own)"])
    print(f"per-key limiter cost per request (admit + release), median of {args.rounds} rounds of "
          f"{args.iterations}, {os.cpu_count()} CPUs")
    for name, got in results.items():
        med = statistics.median(got)
        print(f"  {name:<40} {med:6.2f} us   x{med / base:5.2f} of local")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
