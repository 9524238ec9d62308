"""What /proc says about a process on a GPU: its cgroup and its session (for core/gpu_usage.py)."""

from __future__ import annotations

from pathlib import Path

from nebula.core.gpu_usage import GpuProcess


def read_process(pid: int, used_mib: int, proc: Path = Path("/proc")) -> GpuProcess:
    """A process NVML listed, with its cgroup and session; empty ones when it is gone or hidden (another PID
    namespace, hidepid): such a process is not an engine's, so its memory counts as used outside Nebula."""
    base = proc / str(pid)
    try:
        cgroup = (base / "cgroup").read_text()
    except OSError:
        cgroup = ""
    session: int | None = None
    try:
        stat = (base / "stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        session = int(fields[3])  # state, ppid, pgrp, session
    except (OSError, IndexError, ValueError):
        pass
    return GpuProcess(pid=pid, used_mib=used_mib, cgroup=cgroup, session=session)
