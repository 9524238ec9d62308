"""GPU inventory and health from NVML (`nvidia-ml-py`). A machine without GPUs or driver reports none, never crashes.

A reading a GPU does not support (power on some boards, utilisation under MIG) is None rather than an
error: the rest of that GPU's readings still count. GPU indices are NVML's, which are PCI bus order.

Beside the figures: the processes on each GPU with their memory (whose they are is core/gpu_usage.py's
question), and which GPUs are adjacent (NVLink between them, or PCIe switches without the CPU's host
bridge), as link groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from nebula.core.gpu_usage import link_groups

T = TypeVar("T")
MIB = 2**20
# nvmlGpuTopologyLevel_t: 0 on one board, 10 one PCIe switch, 20 several switches, 30 the host bridge, ...
_TOPOLOGY_ADJACENT_MAX = 20


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    used_bytes: int


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
    processes: tuple[ProcessMemory, ...] | None = None
    """The processes using the GPU (compute and graphics); None where NVML cannot list them."""
    link_group: int = 0

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
                      power_limit_w=None if limit is None else float(limit) / 1000.0,
                      processes=_processes(pynvml, h))


def _processes(pynvml: Any, h: Any) -> tuple[ProcessMemory, ...] | None:
    found: dict[int, int] = {}
    try:
        listed = [*pynvml.nvmlDeviceGetComputeRunningProcesses(h), *pynvml.nvmlDeviceGetGraphicsRunningProcesses(h)]
    except pynvml.NVMLError:
        return None
    for p in listed:
        used = p.usedGpuMemory
        # NVML_VALUE_NOT_AVAILABLE (no per-process figure, e.g. without privilege) reads as None or 2**64-1.
        if isinstance(used, int) and 0 <= used < 2**63:
            found[int(p.pid)] = max(found.get(int(p.pid), 0), used)
        else:
            found.setdefault(int(p.pid), 0)
    return tuple(ProcessMemory(pid, used) for pid, used in sorted(found.items()))


def _adjacent(pynvml: Any, handles: list[Any]) -> list[tuple[int, int]]:
    pairs = []
    for i in range(len(handles)):
        for j in range(i + 1, len(handles)):
            try:
                nvlink = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                if nvlink == pynvml.NVML_P2P_STATUS_OK:
                    pairs.append((i, j))
                    continue
            except (pynvml.NVMLError, AttributeError):
                pass
            try:
                if pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]) <= _TOPOLOGY_ADJACENT_MAX:
                    pairs.append((i, j))
            except (pynvml.NVMLError, AttributeError):
                pass
    return pairs


def _read_all(pynvml: Any, known_groups: dict[int, int]) -> tuple[GpuReading, ...]:
    count = pynvml.nvmlDeviceGetCount()
    readings = [_read_one(pynvml, i) for i in range(count)]
    if set(known_groups) != set(range(count)):  # topology is fixed while the machine runs: read it once
        known_groups.clear()
        known_groups.update(link_groups(range(count), _adjacent(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i)
                                                                         for i in range(count)])))
    return tuple(replace(r, link_group=known_groups[r.index]) for r in readings)


class NvmlReader:
    """A GpuReader that reads the topology on its first reading only (n x n NVML calls)."""

    def __init__(self) -> None:
        self._groups: dict[int, int] = {}

    def __call__(self) -> tuple[tuple[GpuReading, ...], str]:
        return read_gpus(self._groups)


def read_gpus(known_groups: dict[int, int] | None = None) -> tuple[tuple[GpuReading, ...], str]:
    """(GPUs, note): the note says why there are none, for one log line. `known_groups`: link groups read
    before (filled in when empty)."""
    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), f"NVML unavailable ({e})"
    try:
        return _read_all(pynvml, {} if known_groups is None else known_groups), ""
    except pynvml.NVMLError as e:  # a GPU fallen off the bus, a driver being reloaded
        return (), f"NVML read failed ({e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
