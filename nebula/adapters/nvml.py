"""GPU inventory from NVML (`nvidia-ml-py`). A machine without GPUs or driver reports none, never crashes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int


def read_gpus() -> tuple[tuple[GpuReading, ...], str]:
    """(GPUs, note): the note says why there are none, for one log line."""
    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), f"NVML unavailable ({e})"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(GpuReading(index=i, name=name if isinstance(name, str) else name.decode(),
                                   memory_total_mib=int(mem.total) // 2**20,
                                   memory_used_mib=int(mem.used) // 2**20))
        return tuple(gpus), ""
    finally:
        pynvml.nvmlShutdown()
