"""The node agent's /metrics: instances by model and phase, engine failures and restarts, reconcile passes
(the agent against the in-memory store and unit table of test_agent; AgentMetrics.observe on its own)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.memstore import MemoryStore
from nebula.core.config import NebulaConfig
from nebula.core.model import InstanceStatus, NodeRecord, Phase
from nebula.core.units import UnitState
from nebula.services.agent.agent import NodeAgent
from nebula.services.agent.metrics import AgentMetrics
from nebula.services.agent.specfiles import SpecFiles
from tests.unit.test_agent import CrashingUnits, model_dir, place_on


def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def st(inst: str, model: str, phase: Phase, restarts: int = 0) -> InstanceStatus:
    return InstanceStatus(instance=inst, model=model, node="n1", phase=phase, endpoint="", restarts=restarts)


def test_instances_by_model_and_phase_and_restart_increases_only() -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry)
    m.observe({"a": st("a", "a", Phase.READY, restarts=3), "a:1": st("a:1", "a", Phase.STARTING),
               "b": st("b", "b", Phase.FAILED)})
    got = series(registry)
    assert got[("nebula_agent_instances", (("model", "a"), ("phase", "ready")))] == 1
    assert got[("nebula_agent_instances", (("model", "a"), ("phase", "starting")))] == 1
    assert got[("nebula_agent_instances", (("model", "a"), ("phase", "failed")))] == 0
    assert got[("nebula_agent_instances", (("model", "b"), ("phase", "failed")))] == 1
    # 3 restarts before this agent looked: a baseline, not 3 new ones.
    assert got[("nebula_agent_engine_restarts_total", (("model", "a"),))] == 0

    m.observe({"a": st("a", "a", Phase.READY, restarts=5), "a:1": st("a:1", "a", Phase.READY, restarts=1)})
    got = series(registry)
    assert got[("nebula_agent_engine_restarts_total", (("model", "a"),))] == 3
    assert got[("nebula_agent_instances", (("model", "a"), ("phase", "ready")))] == 2
    assert not any(name == "nebula_agent_instances" and ("model", "b") in labels for name, labels in got)

    m.observe({"a": st("a", "a", Phase.READY, restarts=0)})  # its unit was started afresh: the count reset
    m.observe({"a": st("a", "a", Phase.READY, restarts=1)})
    assert series(registry)[("nebula_agent_engine_restarts_total", (("model", "a"),))] == 4


async def test_agent_counts_engine_failures_restarts_and_passes(tmp_path: Path) -> None:
    now = [1000.0]
    store, units, registry = MemoryStore(), CrashingUnits(["OSError: a", "OSError: b"]), CollectorRegistry()
    agent = NodeAgent(NebulaConfig(), NodeRecord(name="n1", address="127.0.0.1", port_min=18000, port_max=18010),
                      store, units, SpecFiles(str(tmp_path / "run")), lambda _: _false(), registry,
                      clock=lambda: now[0])
    await agent.on_new_lease(await store.grant_lease(10))
    await place_on(store, agent, "tiny", model_dir(tmp_path))
    await agent.reconcile_once()
    for _ in range(2):
        units.set("tiny", UnitState.FAILED, result="exit-code:1")
        await agent.reconcile_once()  # the failure is seen; the agent restarts it after a delay
        now[0] += 6
        await agent.reconcile_once()
    got = series(registry)
    assert got[("nebula_agent_engine_failures_total", (("model", "tiny"),))] == 2
    assert got[("nebula_agent_engine_restarts_total", (("model", "tiny"),))] == 2
    assert got[("nebula_agent_instances", (("model", "tiny"), ("phase", "starting")))] == 1
    assert got[("nebula_agent_reconcile_passes_total", ())] == 5
    assert got[("nebula_agent_actions_total", (("action", "start"),))] == 3


async def _false() -> bool:
    return False
