"""bench_gateway.py's CPU per hop: user and system time read from /proc over a hop's process tree, and the
kernel's share of it in the report (on loopback that share is the part no user-space change can cut)."""

from __future__ import annotations

import math
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

from bench_baselines import tree_size  # noqa: E402
from bench_gateway import measuring_order, profile_path  # noqa: E402
from bench_load import Scenario, cpu_times, pooled  # noqa: E402
from bench_report import print_rounds, print_scenario, round_ratios, summarize  # noqa: E402


def _burn(code: str, cpu_s: float) -> tuple[float, float]:
    """The (user, system) seconds a child running `code` has used once it has used `cpu_s` in all."""
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while sum(times := cpu_times(child.pid)) < cpu_s and time.monotonic() < deadline:
            time.sleep(0.02)
        return times
    finally:
        child.kill()
        child.wait()


def test_time_in_user_code_and_in_system_calls_are_told_apart() -> None:
    user, system = _burn("while True: pass", 0.3)
    assert user >= 0.25 and system < user / 4
    # Reads of 1 MiB from /dev/zero: almost all of it is the kernel's (zeroing the buffer in the syscall).
    user, system = _burn("import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nwhile True: os.read(fd, 1 << 20)", 0.3)
    assert system >= 0.15 and system > user


def test_a_hop_is_sized_with_its_child_processes_and_their_threads() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while tree_size(parent.pid) != (3, 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tree_size(parent.pid) == (3, 3)  # sh and its two sleeps, one thread each
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert tree_size(parent.pid) == (0, 0)  # gone: nothing to count


def _raw(cpu_s: dict[str, float], system_s: dict[str, float]) -> dict[str, Any]:
    return {"ok": 100, "errors": 0, "first_error": "", "wall_s": 3.0, "tokens": 100 * 128,
            "ttft_ms": [50.0] * 100, "total_ms": [1330.0] * 100, "cpu_s": cpu_s, "cpu_system_s": system_s}


def test_the_report_gives_the_kernels_share_of_each_hops_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    sc = Scenario("realistic_c128", stream=True, concurrency=128, tokens=128, ttft_ms=50, tpot_ms=10)
    res = {"direct": summarize(_raw({"engine": 0.5}, {"engine": 0.1})),
           "proxy": summarize(_raw({"proxy": 0.4, "engine": 0.5}, {"proxy": 0.1, "engine": 0.4})),
           "nebula": summarize(_raw({"gateway": 0.2, "engine": 0.5}, {"gateway": 0.144, "engine": 0.5}))}
    assert res["nebula"]["cpu_kernel_share"] == pytest.approx(0.72)  # the engine's is not the hop's
    assert res["proxy"]["cpu_kernel_share"] == pytest.approx(0.25)
    print_scenario(sc, res)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    assert rows["nebula"].endswith("gateway 2.00 (kernel 72%)")
    assert rows["proxy"].endswith("proxy 4.00 (kernel 25%)")
    assert "kernel" not in rows["direct"]
    # A measurement from before the split (no cpu_system_s) is reported without it.
    old = _raw({"gateway": 0.2}, {})
    del old["cpu_system_s"]
    assert math.isnan(summarize(old)["cpu_kernel_share"])


def test_rounds_run_the_targets_every_other_time_backwards() -> None:
    targets = ["direct", "proxy", "nebula", "vllm_router"]
    assert measuring_order(targets) == targets
    assert measuring_order(targets, 3) == [*targets, *reversed(targets), *targets]
    # --compare-src: A B first and B A last within each round.
    assert measuring_order(["direct", "nebula", "nebula_ref", "vllm_router"], 2) == [
        "direct", "nebula", "nebula_ref", "vllm_router", "nebula_ref", "nebula",
        "nebula", "nebula_ref", "vllm_router", "nebula_ref", "nebula", "direct"]


def test_pooled_measurements_add_up_their_user_and_kernel_time() -> None:
    both = pooled([_raw({"gateway": 0.2, "engine": 0.5}, {"gateway": 0.1, "engine": 0.4}),
                   _raw({"gateway": 0.3, "engine": 0.5}, {"gateway": 0.2, "engine": 0.4})])
    assert both["ok"] == 200
    assert both["cpu_s"] == pytest.approx({"gateway": 0.5, "engine": 1.0})
    assert both["cpu_system_s"] == pytest.approx({"gateway": 0.3, "engine": 0.8})
    assert summarize(both)["cpu_kernel_share"] == pytest.approx(0.6)


def test_each_rounds_ratio_to_vllm_router_is_given_beside_the_pooled_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    sc = Scenario("nonstream32_c64", stream=False, concurrency=64)
    raws = {"direct": [_raw({"engine": 0.5}, {})] * 2,
            "nebula": [_raw({"gateway": 0.9}, {}), _raw({"gateway": 1.1}, {})],
            # measured twice a round (--compare-src): the two are pooled within their round
            "nebula_ref": [_raw({"gateway": 1.0}, {}), _raw({"gateway": 1.2}, {}),
                           _raw({"gateway": 0.8}, {}), _raw({"gateway": 1.0}, {})],
            "vllm_router": [_raw({"vllm_router": 1.0}, {}), _raw({"vllm_router": 1.0}, {})]}
    ratios = round_ratios(sc, raws, 2)
    assert ratios["nebula"] == pytest.approx([0.9, 1.1])
    assert ratios["nebula_ref"] == pytest.approx([1.1, 0.9])
    assert set(ratios) == {"nebula", "nebula_ref"}  # direct is not relative to anything
    print_rounds(sc, raws, 2)
    assert "nebula/vllm-router by round: 0.90 1.10 (median 1.00)" in capsys.readouterr().out
    # One round: nothing to spread. Without vllm-router: nothing to relate to, and the report says so.
    assert round_ratios(sc, {t: each[:1] for t, each in raws.items()}, 1) == {}
    del raws["vllm_router"]
    assert round_ratios(sc, raws, 2) == {}
    print_rounds(sc, raws, 2)
    assert "by round: no ratios without vllm-router" in capsys.readouterr().out


def test_each_measurement_of_a_target_gets_its_own_profile(tmp_path: Path) -> None:
    # --rounds 2 with --compare-src measures nebula four times in a scenario: four files, the first under the
    # name profile-summary's example uses.
    names = [profile_path(tmp_path, "stream32_c64", "gateway", n) for n in range(4)]
    assert names[0] == tmp_path / "stream32_c64-gateway.txt"
    assert len(set(names)) == 4 and names[1] == tmp_path / "stream32_c64-gateway-2.txt"
