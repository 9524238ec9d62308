"""The node agent's passes against the in-memory store and an in-memory unit table (pure-logic test;
the real systemd and process back-ends have their own tests)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps
from nebula.core.units import UnitState, UnitStatus
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.specfiles import SpecFiles
from tests.harness.mirrors import mirrored


class TableUnits:
    """Units that change state only when the test says so; counts starts to prove re-adoption."""

    def __init__(self, *, manager_restarts: bool = True) -> None:
        self.units: dict[str, UnitStatus] = {}
        self.starts = 0
        self.manager_restarts = manager_restarts

    async def list(self) -> Mapping[str, UnitStatus]:
        return dict(self.units)

    async def start(self, instance: str) -> None:
        self.starts += 1
        self.units[instance] = UnitStatus(instance, UnitState.ACTIVATING)

    async def stop(self, instance: str) -> None:
        self.units[instance] = UnitStatus(instance, UnitState.DEACTIVATING)

    async def reset(self, instance: str) -> None:
        self.units.pop(instance, None)

    async def close(self) -> None:
        pass

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        return [f"{instance}: line {i}" for i in range(lines)][-2:]

    @property
    def restarts_failed(self) -> bool:
        return self.manager_restarts

    def set(self, instance: str, state: UnitState, result: str = "", restarts: int = 0) -> None:
        self.units[instance] = UnitStatus(instance, state, result=result, restarts=restarts)


def model_dir(tmp_path: Path) -> str:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


async def make_agent(tmp_path: Path, store: MemoryStore, units: TableUnits, healthy: set[str],
                     clock: Callable[[], float] = lambda: 1000.0) -> NodeAgent:
    node = NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010)

    async def health(endpoint: str) -> bool:
        return endpoint in healthy

    agent = NodeAgent(NebulaConfig(), node, store, units, SpecFiles(str(tmp_path / "run")), health,
                      CollectorRegistry(), clock=clock)
    await agent.on_new_lease(await store.grant_lease(10))
    return agent


async def place_on(store: MemoryStore, agent: NodeAgent, inst: str, source: str) -> None:
    spec = ModelSpec.from_dict({"name": inst, "source": source})
    p = Placement(instance=inst, node="n1", model=spec, port=18000)
    await store.put(keys.placement_key("n1", inst), dumps(p.to_dict()))
    snap = await store.list_prefix(keys.node_placements_prefix("n1"))
    agent.on_placements(mirrored(records.PLACEMENTS, {kv.key: kv for kv in snap.items}))


async def phase(store: MemoryStore, inst: str) -> str | None:
    kv = await store.get(keys.instance_key(inst))
    return None if kv is None else str(json.loads(kv.value)["phase"])


async def test_lifecycle_and_readoption(tmp_path: Path) -> None:
    store, units, healthy = MemoryStore(), TableUnits(), set[str]()
    agent = await make_agent(tmp_path, store, units, healthy)
    assert (await store.get(keys.node_key("n1"))) is not None
    await agent.reconcile_once()  # placements not listed yet: nothing happens
    assert units.starts == 0
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    assert units.starts == 1 and await phase(store, "tiny") == "starting"
    assert json.loads((tmp_path / "run/engines/tiny.json").read_text())["port"] == 18000
    units.set("tiny", UnitState.ACTIVE)
    healthy.add("http://127.0.0.1:18000")
    await agent.reconcile_once()
    assert await phase(store, "tiny") == "ready"

    # A restarted agent finds the running engine with the same spec and does not restart it.
    again = await make_agent(tmp_path, store, units, healthy)
    await place_on(store, again, "tiny", model_dir(tmp_path))
    await again.reconcile_once()
    assert units.starts == 1 and await phase(store, "tiny") == "ready"

    # Unload: the placement goes, the unit drains, then the instance disappears.
    await store.delete(keys.placement_key("n1", "tiny"))
    again.on_placements(mirrored(records.PLACEMENTS))
    await again.reconcile_once()
    assert units.units["tiny"].state is UnitState.DEACTIVATING
    assert await phase(store, "tiny") == "draining"
    units.set("tiny", UnitState.INACTIVE)
    await again.reconcile_once()
    assert await phase(store, "tiny") is None
    assert not (tmp_path / "run/engines/tiny.json").exists()


async def test_each_instance_record_says_how_it_got_to_its_phase(tmp_path: Path) -> None:
    store, units, healthy = MemoryStore(), TableUnits(), set[str]()
    now = [1000.0]
    agent = await make_agent(tmp_path, store, units, healthy, clock=lambda: now[0])

    async def record() -> dict[str, Any]:
        kv = await store.get(keys.instance_key("tiny"))
        assert kv is not None
        return dict(json.loads(kv.value))

    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    assert "history" not in await record(), "a first phase has no history (and the record reads as before)"
    units.set("tiny", UnitState.ACTIVE)
    healthy.add("http://127.0.0.1:18000")
    now[0] = 1085.0
    await agent.reconcile_once()
    now[0] = 1086.0
    await agent.reconcile_once()  # the same phase again adds nothing
    st = await record()
    assert (st["phase"], st["since"], st["history"]) == ("ready", 1085.0, [["starting", 1000.0]])
    now[0] = 1090.0
    await store.delete(keys.placement_key("n1", "tiny"))
    agent.on_placements(mirrored(records.PLACEMENTS))
    await agent.reconcile_once()
    st = await record()
    assert (st["phase"], st["history"]) == ("draining", [["starting", 1000.0], ["ready", 1085.0]])


async def test_missing_source_fails_with_reason_and_starts_nothing(tmp_path: Path) -> None:
    store, units = MemoryStore(), TableUnits()
    agent = await make_agent(tmp_path, store, units, set())
    await place_on(store, agent, "ghost", "/nonexistent/model")
    await agent.reconcile_once()
    kv = await store.get(keys.instance_key("ghost"))
    assert kv is not None
    st = json.loads(kv.value)
    assert st["phase"] == "failed" and "/nonexistent/model does not exist" in st["message"]
    assert units.starts == 0


async def test_orphan_unit_is_stopped(tmp_path: Path) -> None:
    store, units = MemoryStore(), TableUnits()
    units.set("stray", UnitState.ACTIVE)
    agent = await make_agent(tmp_path, store, units, set())
    agent.on_placements(mirrored(records.PLACEMENTS))
    await agent.reconcile_once()
    assert units.units["stray"].state is UnitState.DEACTIVATING


async def test_lost_lease_rewrites_node_and_instances(tmp_path: Path) -> None:
    store, units, healthy = MemoryStore(), TableUnits(), {"http://127.0.0.1:18000"}
    agent = await make_agent(tmp_path, store, units, healthy)
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    await store.revoke_lease(agent.lease)
    assert await store.get(keys.node_key("n1")) is None and await phase(store, "tiny") is None
    await agent.on_new_lease(await store.grant_lease(10))
    await agent.reconcile_once()
    assert await store.get(keys.node_key("n1")) is not None and await phase(store, "tiny") == "starting"


async def status_of(store: MemoryStore, inst: str) -> dict[str, object]:
    kv = await store.get(keys.instance_key(inst))
    assert kv is not None
    return dict(json.loads(kv.value))


async def test_systemd_failure_shows_last_output(tmp_path: Path) -> None:
    store, units = MemoryStore(), TableUnits(manager_restarts=True)
    agent = await make_agent(tmp_path, store, units, set())
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    units.set("tiny", UnitState.FAILED, result="start-limit-hit", restarts=5)
    await agent.reconcile_once()
    st = await status_of(store, "tiny")
    assert st["phase"] == "failed" and st["restarts"] == 5
    assert st["message"] == "engine unit failed (start-limit-hit) after 5 restart(s): tiny: line 39"
    assert units.starts == 1, "systemd restarts engines itself; the agent must not"


class CrashingUnits(TableUnits):
    """Process-mode units whose engine writes `errors[i]` as its last line on its i-th failure."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__(manager_restarts=False)
        self.errors = list(errors)

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        return ["(APIServer pid=1) Traceback (most recent call last):",
                f"(APIServer pid={self.starts}) {self.errors[self.starts - 1]}",
                "2025-01-31 12:00:01,123 ERROR nebula.engine: engine exited unexpectedly with status 1"]


async def test_process_engine_restarts_with_delay_then_gives_up(tmp_path: Path) -> None:
    """Six different failures: five restarts, each progress line counting the restarts the record carries,
    and a final reason with the same count (it once said 0: the count came from the unit, which has none)."""
    now = [1000.0]
    store, units = MemoryStore(), CrashingUnits([f"RuntimeError: crash {i}" for i in range(1, 7)])
    agent = await make_agent(tmp_path, store, units, set(), clock=lambda: now[0])
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    assert units.starts == 1
    for attempt in range(1, 6):
        units.set("tiny", UnitState.FAILED, result="exit-code:1")
        await agent.reconcile_once()  # failure seen; the restart waits for its delay
        st = await status_of(store, "tiny")
        assert st["phase"] == "starting" and st["restarts"] == attempt - 1
        assert st["message"] == (f"engine exited (exit-code:1): RuntimeError: crash {attempt}; "
                                 f"restarting ({attempt - 1} so far)")
        assert units.starts == attempt
        now[0] += 6
        await agent.reconcile_once()
        assert units.starts == attempt + 1
        assert (await status_of(store, "tiny"))["restarts"] == attempt
    units.set("tiny", UnitState.FAILED, result="exit-code:1")
    await agent.reconcile_once()
    now[0] += 60
    await agent.reconcile_once()
    st = await status_of(store, "tiny")
    assert units.starts == 6 and st["phase"] == "failed" and st["restarts"] == 5
    assert st["message"] == "engine unit failed (exit-code:1) after 5 restart(s): RuntimeError: crash 6"


async def test_process_engine_failing_the_same_way_twice_fails_at_once(tmp_path: Path) -> None:
    """A deterministic failure (vLLM refusing an argument) is not restarted five times: the second identical
    error ends it, with that error as the one-line reason."""
    now = [1000.0]
    error = "ValueError: User-specified max_model_len (2048) is greater than the derived max_model_len (512)"
    store, units = MemoryStore(), CrashingUnits([error, error, error])
    agent = await make_agent(tmp_path, store, units, set(), clock=lambda: now[0])
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    units.set("tiny", UnitState.FAILED, result="exit-code:1")
    await agent.reconcile_once()
    now[0] += 6
    await agent.reconcile_once()
    assert units.starts == 2, "a first failure is restarted: it may have been transient"
    units.set("tiny", UnitState.FAILED, result="exit-code:1")
    await agent.reconcile_once()
    st = await status_of(store, "tiny")
    assert st["phase"] == "failed" and st["restarts"] == 1
    assert st["message"] == f"{error} (the same error twice: not restarted)"
    now[0] += 600
    await agent.reconcile_once()
    assert units.starts == 2


class SystemdCrashingUnits(CrashingUnits):
    """Units under a service manager with Restart=: the engine writes `errors[n]` before its n-th restart."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__(errors)
        self.manager_restarts = True
        self.restarts = 0

    def crash(self, instance: str) -> None:
        """The engine exits; systemd waits RestartSec= before it starts it again (`auto-restart`)."""
        self.restarts += 1
        self.units[instance] = UnitStatus(instance, UnitState.ACTIVATING, sub_state="auto-restart",
                                          restarts=self.restarts, result="exit-code")

    def restarted(self, instance: str) -> None:
        self.units[instance] = UnitStatus(instance, UnitState.ACTIVATING, sub_state="start", restarts=self.restarts)

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        return ["(APIServer pid=1) Traceback (most recent call last):",
                f"(APIServer pid={self.restarts}) {self.errors[self.restarts - 1]}"]


async def test_systemd_engine_failing_the_same_way_twice_is_stopped_between_restarts(tmp_path: Path) -> None:
    """Under systemd the unit never shows `failed` until StartLimitBurst (five starts): the agent sees each
    failure between systemd's restarts, and stops the unit at the second identical error."""
    error = "ValueError: User-specified max_model_len (2048) is greater than the derived max_model_len (512)"
    store, units = MemoryStore(), SystemdCrashingUnits([error, error, error])
    agent = await make_agent(tmp_path, store, units, set())
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    assert units.starts == 1
    units.crash("tiny")
    await agent.reconcile_once()
    st = await status_of(store, "tiny")
    assert st["phase"] == "starting" and error in str(st["message"]) and "systemd restarts it" in str(st["message"])
    units.restarted("tiny")
    await agent.reconcile_once()
    units.crash("tiny")
    await agent.reconcile_once()
    assert units.units["tiny"].state is UnitState.DEACTIVATING, "the second identical error stops the unit"
    units.units.pop("tiny")  # stopped: systemd forgets an inactive unit
    await agent.reconcile_once()
    await agent.reconcile_once()
    st = await status_of(store, "tiny")
    assert st["phase"] == "failed" and st["message"] == f"{error} (the same error twice: not restarted)"
    assert units.starts == 1, "the agent does not start what it stopped"
    # A new spec (the operator fixed the model) starts afresh.
    spec = ModelSpec.from_dict({"name": "tiny", "source": model_dir(tmp_path), "max_model_len": 256})
    await store.put(keys.placement_key("n1", "tiny"), dumps(Placement(instance="tiny", node="n1", model=spec,
                                                                      port=18000).to_dict()))
    agent.on_placements(mirrored(records.PLACEMENTS, {kv.key: kv for kv in
                                                      (await store.list_prefix(keys.PLACEMENTS)).items}))
    await agent.reconcile_once()
    assert units.starts == 2
