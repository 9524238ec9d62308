"""bench_gateway.py --syscalls: the counts perf writes, per request, in the report. The counting itself needs perf
and root (the syscall tracepoints), which CI machines do not promise, so the fixture is perf's own output
(`perf stat -x, -e 'syscalls:sys_enter_*' -p <gateway>` over a realistic_c128 window on the 2-core dev box)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gateway import read_syscall_counts  # noqa: E402
from bench_load import Scenario, pooled, process_tree  # noqa: E402
from bench_report import print_scenario, summarize  # noqa: E402

PERF_CSV = (ROOT / "tests" / "fixtures" / "perf" / "stat-syscalls.csv").read_text()


def test_the_calls_made_are_read_by_name_and_those_never_made_or_not_counted_are_left_out() -> None:
    assert read_syscall_counts(PERF_CSV) == {
        "getpid": 60, "futex": 167, "write": 75338, "read": 75896, "epoll_pwait": 12385, "epoll_wait": 26,
        "recvmsg": 14, "sendmsg": 21, "recvfrom": 23}


def _raw(ok: int, syscalls: dict[str, int] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"ok": ok, "errors": 0, "first_error": "", "wall_s": 3.0, "tokens": ok * 128,
                           "ttft_ms": [50.0] * ok, "total_ms": [1330.0] * ok, "cpu_s": {"gateway": 1.5}}
    if syscalls is not None:
        raw["syscalls"] = syscalls
    return raw


def test_two_measurements_of_one_target_add_their_calls_up() -> None:
    both = pooled([_raw(100, {"read": 300, "write": 280}), _raw(50, {"read": 150, "epoll_pwait": 20})])
    assert both["ok"] == 150
    assert both["syscalls"] == {"read": 450, "write": 280, "epoll_pwait": 20}


def test_the_report_gives_calls_per_request_most_made_first(capsys: pytest.CaptureFixture[str]) -> None:
    sc = Scenario("realistic_c128", stream=True, concurrency=128, tokens=128, ttft_ms=50, tpot_ms=10)
    counts = read_syscall_counts(PERF_CSV)
    res = {"direct": summarize(_raw(576)), "proxy": summarize(_raw(576, {"read": 576 * 3})),
           "nebula": summarize(_raw(576, counts))}
    calls = res["nebula"]["syscalls_req"]
    assert list(calls)[:3] == ["read", "write", "epoll_pwait"]
    assert calls["read"] == pytest.approx(75896 / 576)
    assert sum(calls.values()) == pytest.approx(sum(counts.values()) / 576)
    assert "syscalls_req" not in res["direct"]  # not counted: no line for it
    print_scenario(sc, res)
    lines = capsys.readouterr().out.splitlines()
    report = lines[lines.index(next(line for line in lines if line.startswith("nebula"))) + 1]
    assert report.split() == ["system", "calls", "per", "request", f"{sum(counts.values()) / 576:.2f}:",
                              "read", "131.76,", "write", "130.80,", "epoll_pwait", "21.50,", "futex", "0.29,",
                              "getpid", "0.10"]


def test_a_hop_is_counted_with_its_child_processes() -> None:
    """As nginx's master and worker, or the gateway's supervisor and its workers: perf is given them all."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tree[0] == parent.pid and len(tree) == 3
        for kid in tree[1:]:
            with open(f"/proc/{kid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == parent.pid  # its parent
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the sleeps too
        parent.wait()
