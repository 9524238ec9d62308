"""scripts/bench_workers.py end to end at a small scale: wrk, the canned engine, etcd and the real gateway at 1
and 2 workers. The figures themselves are not judged (a timed test on a shared box is noise); that every row
was measured, without errors, and that both workers of the second gateway served requests, is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_workers.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240,
                          cwd=ROOT)


def test_bench_measures_each_worker_count_through_the_gateway() -> None:
    proc = _run("--workers", "1,2", "--duration-s", "1", "--warmup-s", "1", "--connections", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("JSON ")]
    assert len(summary) == 1, proc.stdout[-3000:]
    results: dict[str, dict[str, Any]] = json.loads(summary[0].removeprefix("JSON "))["results"]
    assert set(results) == {"direct", "1", "2"}
    for label, res in results.items():
        assert res["errors"] == 0 and res["requests"] > 0 and res["rps"] > 0, (label, res)
        assert 0 < res["p50_ms"] <= res["p99_ms"], (label, res)
        # The engine's and wrk's own CPU, so that the table shows which process was the limit.
        assert res["engine_us_req"] > 0 and res["wrk_us_req"] > 0, (label, res)
    for label in ("1", "2"):
        assert math.isfinite(results[label]["gateway_us_req"]) and results[label]["gateway_us_req"] > 0, label
        assert results[label]["gateway_cores"] > 0, label
    assert results["1"]["worker_shares"] == []  # one worker: the gateway is one process
    shares = results["2"]["worker_shares"]
    # 16 connections spread by the kernel over two listeners: both workers answer some (all 16 on one: 3e-5).
    assert len(shares) == 2 and all(s > 0.02 for s in shares), shares
    assert "1.00x" in proc.stdout  # the scaling column, against the first count


def test_bench_without_wrk_says_how_to_install_it(tmp_path: Path) -> None:
    proc = _run("--wrk", str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert "apt-get install -y wrk" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_refuses_a_worker_count_below_one() -> None:
    proc = _run("--workers", "0,2")
    assert proc.returncode == 2 and "--workers" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_refuses_no_engine_or_client() -> None:
    for option in ("--engine-procs", "--threads", "--connections"):
        proc = _run(option, "-1")
        assert proc.returncode == 2 and option in proc.stderr and "Traceback" not in proc.stderr, option
