"""The agent's GPU part: it tells the sampler which engines run, publishes the memory used outside Nebula in
its node record (only when it moved), and writes the tensor-parallel size into the engine spec."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.nvml import GpuReading, ProcessMemory
from nebula.adapters.procinfo import read_process
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement, dumps, loads
from nebula.core.units import UnitState, UnitStatus
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.gpus import GpuSampler
from nebula.services.agent.specfiles import SpecFiles
from tests.harness.mirrors import mirrored
from tests.unit.test_agent import TableUnits

PROC = Path(__file__).resolve().parents[1] / "fixtures/proc"
GIB = 2**30


class Gpus:
    """One H200 and one H100 on an NVLink; `procs` are what NVML lists on GPU 0."""

    def __init__(self) -> None:
        self.procs: tuple[ProcessMemory, ...] = ()

    def __call__(self) -> tuple[tuple[GpuReading, ...], str]:
        used = GIB // 2 + sum(p.used_bytes for p in self.procs)
        return (GpuReading(index=0, name="NVIDIA H200", memory_total_bytes=141 * GIB, memory_used_bytes=used,
                           processes=self.procs),
                GpuReading(index=1, name="NVIDIA H200", memory_total_bytes=141 * GIB, memory_used_bytes=GIB // 2,
                           processes=())), ""


async def node_gpus(store: MemoryStore) -> tuple[Gpu, ...]:
    kv = await store.get(keys.node_key("n1"))
    assert kv is not None
    return NodeRecord.from_dict(loads(kv.value)).gpus


async def test_outside_use_reaches_the_node_record_and_engines_are_known(tmp_path: Path) -> None:
    store, units, gpus = MemoryStore(), TableUnits(), Gpus()
    sampler = GpuSampler(gpus, "n1", read_proc=lambda pid, mib: read_process(pid, mib, PROC))
    sampler.sample()
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010,
                      gpus=(Gpu(0, "NVIDIA H200", 141 * 1024, 512, memory_outside_mib=512),
                            Gpu(1, "NVIDIA H200", 141 * 1024, 512, memory_outside_mib=512)))

    async def healthy(_: str) -> bool:
        return True

    agent = NodeAgent(NebulaConfig(), node, store, units, SpecFiles(str(tmp_path / "run")), healthy,
                      CollectorRegistry(), gpus=sampler)
    await agent.on_new_lease(await store.grant_lease(10))
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text("{}")
    spec = ModelSpec.from_dict({"name": "big", "source": str(tmp_path / "model"), "gpus_per_replica": 2,
                                "tensor_parallel_size": 2, "gpu_memory_mib": 60 * 1024})
    p = Placement(instance="big", node="n1", model=spec, port=18000, gpu_indices=(0, 1))
    await store.put(keys.placement_key("n1", "big"), dumps(p.to_dict()))
    snap = await store.list_prefix(keys.node_placements_prefix("n1"))
    agent.on_placements(mirrored(records.PLACEMENTS, {kv.key: kv for kv in snap.items}))
    await agent.reconcile_once()
    written = json.loads((tmp_path / "run/engines/big.json").read_text())
    assert written["tensor_parallel_size"] == 2 and written["gpu_memory_utilization"] == 0.42
    assert sampler.engines.running == {"big"} and sampler.engines.declared_mib == {0: 60 * 1024, 1: 60 * 1024}

    # A notebook takes 70 GiB of GPU 0 (process 6000); the engine's session leader is 5000 (workers 5100).
    units.units["big"] = UnitStatus("big", UnitState.ACTIVE, main_pid=5000)
    await agent.reconcile_once()  # the sampler learns the session
    gpus.procs = (ProcessMemory(5100, 60 * GIB), ProcessMemory(6000, 70 * GIB))
    sampler.sample()
    await agent.reconcile_once()
    assert [g.memory_outside_mib for g in await node_gpus(store)] == [70 * 1024 + 512, 512]
    assert sampler.usage[0].by_engine == {"big": 60 * 1024}

    # A move under [node] gpu_outside_step_mib is not worth a write.
    before = (await store.get(keys.node_key("n1")))
    gpus.procs = (ProcessMemory(5100, 60 * GIB), ProcessMemory(6000, 70 * GIB + 100 * 2**20))
    sampler.sample()
    await agent.reconcile_once()
    after = await store.get(keys.node_key("n1"))
    assert before is not None and after is not None and after.mod_revision == before.mod_revision
