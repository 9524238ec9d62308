"""nebula/adapters/nvml.py against a stand-in for the `pynvml` module (this machine has no GPU): processes
and their memory, a per-process figure NVML cannot give, process lists it cannot give, and link groups from
NVLink and PCIe topology, read once."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from nebula.adapters.nvml import NvmlReader, ProcessMemory, read_gpus

NOT_AVAILABLE = 2**64 - 1


class NVMLError(Exception):
    pass


@dataclass
class Proc:
    pid: int
    usedGpuMemory: Any  # NVML's spelling


@dataclass
class Mem:
    total: int
    used: int


def fake_nvml(procs: dict[int, Any], nvlink: set[tuple[int, int]], ancestor: dict[tuple[int, int], int]
              ) -> tuple[types.SimpleNamespace, dict[str, int]]:
    calls = {"topology": 0}

    def unsupported(*_: object) -> Any:
        raise NVMLError("Not Supported")

    def compute(h: int) -> list[Proc]:
        if procs.get(h) is None:
            raise NVMLError("Not Supported")
        return list(procs[h])

    def p2p(a: int, b: int, _caps: int) -> int:
        calls["topology"] += 1
        return 0 if (a, b) in nvlink else 4

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, NVML_P2P_CAPS_INDEX_NVLINK=3, NVML_P2P_STATUS_OK=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetMemoryInfo=lambda h: Mem(80 * 2**30, (h + 1) * 2**30),
        nvmlDeviceGetName=lambda h: b"NVIDIA H100", nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetUtilizationRates=unsupported, nvmlDeviceGetPowerUsage=unsupported,
        nvmlDeviceGetEnforcedPowerLimit=unsupported, nvmlDeviceGetTemperature=unsupported,
        nvmlDeviceGetComputeRunningProcesses=compute, nvmlDeviceGetGraphicsRunningProcesses=lambda h: [],
        nvmlDeviceGetP2PStatus=p2p, nvmlDeviceGetTopologyCommonAncestor=lambda a, b: ancestor.get((a, b), 50))
    return nvml, calls


def test_processes_and_link_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, calls = fake_nvml(
        procs={0: [Proc(10, 5 * 2**30), Proc(11, NOT_AVAILABLE), Proc(10, 2**30)], 1: [Proc(12, None)], 2: [],
               3: None},
        nvlink={(0, 1)}, ancestor={(2, 3): 10})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reader = NvmlReader()
    gpus, note = reader()
    assert note == ""
    assert gpus[0].processes == (ProcessMemory(10, 5 * 2**30), ProcessMemory(11, 0))
    assert gpus[1].processes == (ProcessMemory(12, 0),)
    assert gpus[2].processes == () and gpus[3].processes is None  # none, against: NVML cannot say
    assert [g.link_group for g in gpus] == [0, 0, 2, 2]  # NVLink 0-1, one PCIe switch 2-3
    assert gpus[0].utilization is None and gpus[0].memory_used_mib == 1024
    first = calls["topology"]
    reader()
    assert calls["topology"] == first  # topology is read once


def test_no_topology_is_one_group_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, _ = fake_nvml(procs={0: [], 1: [], 2: [], 3: []}, nvlink=set(), ancestor={})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus, _ = read_gpus()
    assert [g.link_group for g in gpus] == [0, 1, 2, 3]
