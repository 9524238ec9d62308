"""GPU inventory and health from NVML (`nvidia-ml-py`). A machine without GPUs or driver reports none, never crashes.

A reading a GPU does not support (power on some boards, utilisation under MIG) is None rather than an
error: the rest of that GPU's readings still count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
MIB = 2**20


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    uuid: str = ""
    utilization: float | None = None  # busy fraction (0-1) over NVML's last sample period
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    @property
    def memory_total_mib(self) -> int:
        return self.memory_total_bytes // MIB

    @property
    def memory_used_mib(self) -> int:
        return self.memory_used_bytes // MIB


GpuReader = Callable[[], tuple[tuple[GpuReading, ...], str]]


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode(errors="replace")


def _read_one(pynvml: Any, i: int) -> GpuReading:
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)

    def optional(fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except pynvml.NVMLError:
            return None

    util = optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    power = optional(lambda: pynvml.nvmlDeviceGetPowerUsage(h))  # milliwatts
    limit = optional(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h))
    temp = optional(lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
    uuid = optional(lambda: pynvml.nvmlDeviceGetUUID(h))
    return GpuReading(index=i, name=_text(pynvml.nvmlDeviceGetName(h)), uuid=_text(uuid or ""),
                      memory_total_bytes=int(mem.total), memory_used_bytes=int(mem.used),
                      utilization=None if util is None else float(util) / 100.0,
                      temperature_c=None if temp is None else float(temp),
                      power_w=None if power is None else float(power) / 1000.0,
                      power_limit_w=None if limit is None else float(limit) / 1000.0)


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
        return tuple(_read_one(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())), ""
    except pynvml.NVMLError as e:  # a GPU fallen off the bus, a driver being reloaded
        return (), f"NVML read failed ({e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
