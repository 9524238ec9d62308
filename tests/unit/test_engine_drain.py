"""A removed replica finishes its requests before its engine stops: the pure decision, the agent's applier, and
the agent pass end to end (in-memory store and unit table)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.config import NebulaConfig
from nebula.core.engine_drain import keep_draining
from nebula.core.engine_spec import EngineSpec
from nebula.core.model import NodeRecord
from nebula.core.reconcile import Actual, Stop, plan
from nebula.core.units import UnitState, UnitStatus
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.drain import EngineDrain
from nebula.services.agent.specfiles import SpecFiles
from tests.harness.mirrors import mirrored
from tests.unit.test_agent import TableUnits, model_dir, phase, place_on


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keep_draining_until_notice_and_idle_or_timeout() -> None:
    kw = {"notice_s": 2.0, "timeout_s": 60.0}
    assert keep_draining(0.0, 1.0, 0, **kw), "within the notice: a late-routed request may still land"
    assert keep_draining(0.0, 5.0, 3, **kw), "requests (streams) still running"
    assert not keep_draining(0.0, 5.0, 0, **kw)
    assert not keep_draining(0.0, 5.0, None, **kw), "unreadable metrics: nothing to finish"
    assert not keep_draining(0.0, 60.0, 3, **kw), "the drain timeout bounds it"


@given(removed=st.floats(0, 1e6), waited=st.floats(0, 1e4), busy=st.one_of(st.none(), st.integers(0, 100)))
def test_keep_draining_never_past_the_timeout(removed: float, waited: float, busy: int | None) -> None:
    if keep_draining(removed, removed + waited, busy, notice_s=2.0, timeout_s=60.0):
        assert waited < 60.0


def test_a_held_instance_is_not_stopped() -> None:
    spec = EngineSpec(instance="m", model="m", source="/m", port=18000)
    actual = {"m": Actual(UnitStatus("m", UnitState.ACTIVE), spec)}
    assert plan({}, actual) == [Stop("m", "not placed on this node")]
    assert plan({}, actual, hold=frozenset({"m"})) == []


async def test_engine_drain_reads_the_load_only_after_the_notice() -> None:
    clock, asked = Clock(), []
    loads = {"http://e": 2}

    async def busy(endpoint: str) -> int | None:
        asked.append(endpoint)
        return loads[endpoint]

    drain = EngineDrain(busy, notice_s=2.0, timeout_s=30.0, clock=clock)
    assert await drain.hold({"m": "http://e"}) == {"m"} and asked == []
    clock.now = 3.0
    assert await drain.hold({"m": "http://e"}) == {"m"} and asked == ["http://e"]
    loads["http://e"] = 0
    assert await drain.hold({"m": "http://e"}) == frozenset()
    assert await drain.hold({}) == frozenset() and await drain.hold({"m": "http://e"}) == {"m"}, "a new removal"


async def test_the_agent_reports_draining_and_stops_only_once_the_engine_is_idle(tmp_path: Path) -> None:
    store, units, clock = MemoryStore(), TableUnits(), Clock()
    running = {"n": 1}

    async def busy(endpoint: str) -> int | None:
        return running["n"]

    async def health(endpoint: str) -> bool:
        return True

    agent = NodeAgent(NebulaConfig(), NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010),
                      store, units, SpecFiles(str(tmp_path / "run")), health, CollectorRegistry(),
                      drain=EngineDrain(busy, notice_s=2.0, timeout_s=30.0, clock=clock))
    await agent.on_new_lease(await store.grant_lease(10))
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    units.set("tiny", UnitState.ACTIVE)
    await agent.reconcile_once()
    assert await phase(store, "tiny") == "ready"

    await store.delete(keys.placement_key("n1", "tiny"))
    agent.on_placements(mirrored(records.PLACEMENTS))
    await agent.reconcile_once()
    assert units.units["tiny"].state is UnitState.ACTIVE and await phase(store, "tiny") == "draining"
    clock.now = 5.0
    await agent.reconcile_once()
    assert units.units["tiny"].state is UnitState.ACTIVE, "a stream is still running on it"
    running["n"] = 0
    await agent.reconcile_once()
    assert units.units["tiny"].state.value == "deactivating"
