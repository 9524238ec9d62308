"""The agent puts engines to sleep and wakes them as their placements say, against the fake engine's copy of
vLLM 0.32's dev-mode sleep routes (POST /sleep?level=N, POST /wake_up, GET /is_sleeping). CPU vLLM has no
sleep mode, so no real engine can show this here; a GPU-lent run is the place for the real one."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from nebula.adapters.engine_sleep import EngineSleepClient
from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.model import Gpu, ModelSpec, NodeRecord, Placement, dumps
from nebula.core.units import UnitState
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.specfiles import SpecFiles
from tests.harness.mirrors import mirrored
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_agent import TableUnits, model_dir


async def status(store: MemoryStore, inst: str) -> dict[str, str]:
    kv = await store.get(keys.instance_key(inst))
    assert kv is not None
    return dict(json.loads(kv.value))


async def setup(tmp_path: Path, engine: FakeEngine, session: aiohttp.ClientSession
                ) -> tuple[MemoryStore, TableUnits, NodeAgent]:
    store, units = MemoryStore(), TableUnits()
    port = int(engine.endpoint.rsplit(":", 1)[1])
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=port, port_max=port,
                      gpus=(Gpu(0, "H100", 80_000, 0),))

    async def health(endpoint: str) -> bool:
        return endpoint == engine.endpoint and units.units.get("m", None) is not None \
            and units.units["m"].state is UnitState.ACTIVE

    agent = NodeAgent(NebulaConfig(), node, store, units, SpecFiles(str(tmp_path / "run")), health,
                      CollectorRegistry(), sleep=EngineSleepClient(session, 5))
    await agent.on_new_lease(await store.grant_lease(10))
    return store, units, agent


async def place(store: MemoryStore, agent: NodeAgent, source: str, port: int, *, level: int, mode: bool = True,
                gpus: tuple[int, ...] = (0,)) -> None:
    spec = ModelSpec.from_dict({"name": "m", "source": source, "gpus_per_replica": len(gpus)})
    p = Placement(instance="m", node="n1", model=spec, port=port, gpu_indices=gpus, sleep_level=level,
                  sleep_mode=mode)
    await store.put(keys.placement_key("n1", "m"), dumps(p.to_dict()))
    snap = await store.list_prefix(keys.node_placements_prefix("n1"))
    agent.on_placements(mirrored(records.PLACEMENTS, {kv.key: kv for kv in snap.items}))


async def test_a_placement_sleeps_its_engine_and_wakes_it_again(tmp_path: Path) -> None:
    engine = FakeEngine("e")
    engine.sleep_mode = True
    await engine.start()
    port = int(engine.endpoint.rsplit(":", 1)[1])
    try:
        async with aiohttp.ClientSession() as session:
            store, units, agent = await setup(tmp_path, engine, session)
            await place(store, agent, model_dir(tmp_path), port, level=0)
            await agent.reconcile_once()
            spec = json.loads((tmp_path / "run/engines/m.json").read_text())
            assert spec["sleep_mode"] is True
            units.set("m", UnitState.ACTIVE)
            await agent.reconcile_once()
            assert (await status(store, "m"))["phase"] == "ready" and engine.sleep_calls == ["/is_sleeping"]

            await place(store, agent, model_dir(tmp_path), port, level=1)
            await agent.reconcile_once()
            assert engine.sleep_level == 1 and engine.sleep_calls[-1] == "/sleep?level=1&mode=wait"
            st = await status(store, "m")
            assert st["phase"] == "sleeping" and "level 1" in st["message"]
            await agent.reconcile_once()  # nothing more to do: no second call
            assert len(engine.sleep_calls) == 2

            # A restarted agent asks the engine, and wakes it when the placement says so.
            again = NodeAgent(NebulaConfig(), agent.node, store, units, SpecFiles(str(tmp_path / "run")),
                              agent.health, CollectorRegistry(), sleep=EngineSleepClient(session, 5))
            await again.on_new_lease(await store.grant_lease(10))
            await place(store, again, model_dir(tmp_path), port, level=0)
            await again.reconcile_once()
            assert engine.sleep_level == 0 and engine.sleep_calls[-2:] == ["/is_sleeping", "/wake_up"]
            assert (await status(store, "m"))["phase"] == "ready"
            assert units.starts == 1  # sleep and wake restart nothing
    finally:
        await engine.stop()


async def test_an_engine_without_sleep_mode_stays_ready_and_says_why(tmp_path: Path) -> None:
    engine = FakeEngine("e")  # as a CPU engine: the sleep routes answer 404
    await engine.start()
    port = int(engine.endpoint.rsplit(":", 1)[1])
    try:
        async with aiohttp.ClientSession() as session:
            store, units, agent = await setup(tmp_path, engine, session)
            await place(store, agent, model_dir(tmp_path), port, level=2, mode=False, gpus=())
            await agent.reconcile_once()
            units.set("m", UnitState.ACTIVE)
            await agent.reconcile_once()
            st = await status(store, "m")
            assert st["phase"] == "ready" and "cannot sleep: the engine runs without sleep mode" in st["message"]
            assert engine.sleep_calls == []
    finally:
        await engine.stop()


def test_sleep_mode_adds_the_flag_and_dev_mode_on_gpu_only() -> None:
    spec = EngineSpec(instance="m", model="m", source="/w", port=18000, gpu_indices=(0,), sleep_mode=True)
    argv, env = vllm_command(spec, NebulaConfig().engine, cpu=False)
    assert "--enable-sleep-mode" in argv and env["VLLM_SERVER_DEV_MODE"] == "1"
    argv, env = vllm_command(spec, NebulaConfig().engine, cpu=True)
    assert "--enable-sleep-mode" not in argv and "VLLM_SERVER_DEV_MODE" not in env
    assert EngineSpec.from_dict(spec.to_dict()) == spec
    assert "sleep_mode" not in EngineSpec(instance="m", model="m", source="/w", port=1).to_dict()


async def test_an_engine_that_refuses_is_reported_and_not_asked_every_pass(tmp_path: Path) -> None:
    engine = FakeEngine("e")  # started without the dev-mode routes: 404
    await engine.start()
    port = int(engine.endpoint.rsplit(":", 1)[1])
    try:
        async with aiohttp.ClientSession() as session:
            store, units, agent = await setup(tmp_path, engine, session)
            await place(store, agent, model_dir(tmp_path), port, level=1)
            await agent.reconcile_once()
            units.set("m", UnitState.ACTIVE)
            await agent.reconcile_once()
            await agent.reconcile_once()
            st = await status(store, "m")
            assert st["phase"] == "ready" and "cannot sleep: HTTP 404" in st["message"]
            assert engine.sleep_calls == ["/is_sleeping"]
            # A new wish is tried again.
            await place(store, agent, model_dir(tmp_path), port, level=2)
            await agent.reconcile_once()
            assert engine.sleep_calls == ["/is_sleeping", "/is_sleeping"]
    finally:
        await engine.stop()
