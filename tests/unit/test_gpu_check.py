"""scripts/gpu_check.py on this machine, which has no GPU: the run says so and exits 3; its pure parts; and
the whole check run against a stand-in for NVML that reports the stand-in engines' workers (their real pids,
so attribution goes through /proc and their sessions) with the memory they would take."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nebula.adapters.nvml import GpuReading, ProcessMemory
from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.gpu_usage import GpuUsage
from nebula.core.model import Gpu, NodeRecord

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_standin  # noqa: E402

GIB = 2**30
TOTAL = 141 * GIB


def test_without_a_gpu_it_says_so_and_exits_3() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.startswith("no NVIDIA GPU visible (NVML: ") and res.stdout.count("\n") == 1


def test_run_mode_imports_from_the_prepared_wheels_alone(tmp_path: Path) -> None:
    # What --prepare leaves, without pip: the nebula package and pynvml as zipped wheels, and the scripts.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "nebula-0.1.0-py3-none-any.whl", "w") as z:
        for f in (ROOT / "nebula").rglob("*.py"):
            z.write(f, f.relative_to(ROOT).as_posix())
    pynvml = importlib.util.find_spec("pynvml")
    assert pynvml is not None and pynvml.origin is not None
    with zipfile.ZipFile(wheels / "nvidia_ml_py-13-py3-none-any.whl", "w") as z:
        z.write(pynvml.origin, "pynvml.py")
    for name in ("gpu-check.sh", "gpu_check.py", "gpu_standin.py"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / name)
    # -I -S: no site-packages, no PYTHONPATH read by Python itself, no current directory: only the wheels.
    wrapper = tmp_path / "python"
    py = sys.executable
    run = ("import sys, runpy; sys.path[:0] = __import__('os').environ['PYTHONPATH'].split(':'); "
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {py} -I -S "$@"\nexec {py} -I -S -c "{run}" "$@"\n')
    wrapper.chmod(0o755)
    res = subprocess.run([str(tmp_path / "gpu-check.sh")], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ["PATH"], "PYTHON": str(wrapper)}, cwd="/")
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.startswith("no NVIDIA GPU visible (NVML: NVML unavailable")  # pynvml came from the zip


def test_argv_problems_name_what_is_wrong() -> None:
    spec = EngineSpec(instance="m", model="m", source="/m", port=18000, gpu_indices=(2, 3),
                      gpu_memory_utilization=0.45)
    argv, env = vllm_command(spec, EngineConfig(), cpu=False)
    assert gpu_check.argv_problems(spec, argv, env) == []
    bad = [a for a in argv if a not in ("--tensor-parallel-size", "2")]
    assert gpu_check.argv_problems(spec, bad, {"CUDA_VISIBLE_DEVICES": "3,2"}) == [
        "CUDA_VISIBLE_DEVICES='3,2', want '2,3'",
        "CUDA_DEVICE_ORDER=None, want 'PCI_BUS_ID' (NVML's numbering)",
        "--tensor-parallel-size None, want 2"]


def test_sizes_and_shares() -> None:
    node = NodeRecord(name="n", address="a", port_min=1, port_max=9,
                      gpus=(Gpu(0, "H200", 141 * 1024, 600, memory_outside_mib=600),
                            Gpu(1, "L4", 22 * 1024, 20 * 1024, memory_outside_mib=20 * 1024)))
    assert gpu_check.two_replica_need_mib(node, 1024) == 16 * 1024
    busy = NodeRecord(name="n", address="a", port_min=1, port_max=9, gpus=(Gpu(0, "L4", 22 * 1024, 0),))
    assert gpu_check.two_replica_need_mib(busy, 1024) == 5376  # a quarter of 21 GiB, in 256 MiB steps
    assert gpu_standin.allocation_bytes(0.11, TOTAL) == int(0.11 * TOTAL) - 512 * 2**20
    assert gpu_standin.allocation_bytes(0.0, 1000) == 0


def test_the_estimated_need_is_the_memory_estimate() -> None:
    need, how = gpu_check.estimated_need_mib(gpu_check.QWEN25_7B, 8192)
    # Qwen2.5-7B: 14.2 GiB of bf16 weights, 448 MiB of KV cache for 8192 tokens, and the overhead
    assert 14 * 1024 < need < 24 * 1024, how


class FakeNvml:
    """One 141 GiB GPU whose processes are the stand-in workers alive under `root` (as NVML would list them),
    each holding what it says it allocated plus a CUDA context."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self) -> tuple[tuple[GpuReading, ...], str]:
        procs = []
        for f in self.root.glob("*/*.worker.json"):
            w = json.loads(f.read_text())
            try:
                os.kill(w["pid"], 0)
            except ProcessLookupError:
                continue
            procs.append(ProcessMemory(w["pid"], sum(d["allocated_bytes"] for d in w["devices"]) + 512 * 2**20))
        used = GIB // 2 + sum(p.used_bytes for p in procs)
        return (GpuReading(index=0, name="NVIDIA H200", uuid="GPU-fake-0", memory_total_bytes=TOTAL,
                           memory_used_bytes=used, processes=tuple(procs)),), ""


def test_the_whole_run_against_stand_ins_for_nvml_and_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NEBULA_GPU_CHECK_FAKE_ALLOC", str(TOTAL))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rc = gpu_check.main(["--run-root", str(tmp_path), "--start-timeout", "60", "--free-timeout", "30"],
                        read=FakeNvml(tmp_path))
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))}
    assert rc == 0, out
    for check in ("nvml-inventory", "placement-declared", "placement-refused", "tensor-parallel", "standin-start",
                  "standin-pinning", "standin-memory", "memory-freed"):
        assert f"PASS {check}" in lines, out
    assert "2 replicas needing 16 GiB per GPU: check-declared -> GPU 0 port 18000, check-declared:1 -> GPU 0" \
        in lines["PASS placement-declared"]
    assert "--gpu-memory-utilization 0.11 on GPU (0,)" in lines["PASS standin-start"]
    assert "NVML attributes" in lines["PASS standin-memory"]
    assert list(tmp_path.iterdir()) == []  # the run directory is cleaned up


def test_usage_of_counts_a_vanished_process_as_outside() -> None:
    reading = GpuReading(index=0, name="G", memory_total_bytes=TOTAL, memory_used_bytes=GIB,
                         processes=(ProcessMemory(2**22 + 12345, GIB),))
    assert gpu_check.usage_of([reading], {}) == {0: GpuUsage(0, 141 * 1024, 1024, {}, 1024)}
