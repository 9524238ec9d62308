"""scripts/bench-workers-kit.sh: a kit prepared here runs the whole workers bench under a Python that has none of
Nebula's dependencies, with the kit's own etcd and wrk (as on a device machine, where nothing can be installed);
and a kit that cannot run says why, in one line, before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "scripts" / "bench-workers-kit.sh"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _kit(*args: str, python: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # The caller's environment (pip's index settings) less its Python: the system's python3 (with pip) prepares.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHON")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    if python:
        env["PYTHON"] = python
    return subprocess.run(["bash", str(KIT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd="/")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    kit = tmp_path_factory.mktemp("kit") / "kit"
    # The README's device call prepares the GPU check's kit inside this one first: preparing keeps it.
    (kit / "gpu").mkdir(parents=True)
    (kit / "gpu" / "gpu-check.sh").write_text("#!/bin/sh\n")
    proc = _kit("--prepare", str(kit), "--python", VERSION)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"for CPython {VERSION}" in proc.stderr
    assert (kit / "gpu" / "gpu-check.sh").exists()
    yield kit


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CPython of the kit's version with nothing installed: no aiohttp, uvloop, grpc, ... of its own."""
    env = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=60)
    python = str(env / "bin" / "python")
    probe = subprocess.run([python, "-c", "import aiohttp"], capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "No module named 'aiohttp'" in probe.stderr
    return python


def test_kit_holds_the_locked_wheels_etcd_and_wrk(kit: Path) -> None:
    wheels = sorted(p.name for p in (kit / "wheels").glob("*.whl"))
    lock = (ROOT / "packaging" / "debian" / "requirements.lock").read_text()
    for name in ("aiohttp", "grpcio", "uvloop", "httptools", "orjson", "aetcd", "protobuf"):
        [wheel] = [w for w in wheels if w.lower().startswith(name + "-")]
        version = wheel.split("-")[1]
        assert f"\n{name}=={version} " in lock, wheel  # the locked version, nothing newer
    assert (kit / "python-version").read_text().strip() == VERSION
    for binary in ("bin/etcd", "bin/wrk", "libexec/wrk"):
        assert (kit / binary).stat().st_mode & 0o111, binary
    assert {p.name for p in (kit / "lib").iterdir()} == {"libluajit-5.1.so.2", "libssl.so.3", "libcrypto.so.3"}


def test_bench_runs_from_the_kit_alone(kit: Path, bare_python: str) -> None:
    proc = _kit(str(kit), "--workers", "1", "--engine-procs", "2", "--duration-s", "1", "--warmup-s", "1",
                "--connections", "16", python=bare_python)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0]
    assert f"wrk {kit}/bin/wrk, etcd {kit}/bin/etcd" in header, header
    assert "2 engine process(es)" in header and f"Python {VERSION}." in header, header
    [summary] = [line for line in proc.stdout.splitlines() if line.startswith("JSON ")]
    results = json.loads(summary.removeprefix("JSON "))["results"]
    assert set(results) == {"direct", "1"}
    for label, res in results.items():
        assert res["errors"] == 0 and res["requests"] > 0, (label, res)
        # The two engine processes' CPU summed, and wrk's through the kit's wrapper (exec: the same process).
        assert res["engine_us_req"] > 0 and res["wrk_us_req"] > 0, (label, res)
    assert results["1"]["gateway_us_req"] > 0


def test_kit_for_another_python_says_which_to_use(kit: Path, bare_python: str, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "wheels").mkdir(parents=True)
    (other / "python-version").write_text("3.99\n")
    proc = _kit(str(other), python=bare_python, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"for CPython 3.99 and {bare_python} is {VERSION}" in proc.stderr
    assert "--python" in proc.stderr  # the fix: prepare it for this one


@pytest.mark.parametrize("args, message", [
    (["/nonexistent-kit"], "no such kit"),
    (["/tmp"], "is not a kit: make one with --prepare"),
    (["--prepare", "/tmp/unused-kit", "--python", "three"], "--python takes a version like 3.12"),
    (["--prepare"], "usage: scripts/bench-workers-kit.sh --prepare DIR"),
])
def test_bad_use_is_one_line_with_the_fix(args: list[str], message: str) -> None:
    proc = _kit(*args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
