"""The scheduler's /metrics: leader, pass duration, placement changes, and the leader's view of the fleet
(nodes, lost nodes, placements per node, pending models), against the in-memory store on a test clock."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.model import ModelSpec, NodeRecord, dumps
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.mirrors import feed_scheduler
from tests.unit.fake_engine import until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def node(name: str) -> bytes:
    return dumps(NodeRecord(name=name, address="127.0.0.1", port_min=18000, port_max=18100).to_dict())


def model(name: str, **fields: object) -> bytes:
    return dumps(ModelSpec.from_dict({"name": name, "source": "/m", **fields}).to_dict())


async def test_leader_reports_the_fleet_and_a_standby_only_that_it_is_not_leading() -> None:
    store, clock = MemoryStore(), Clock()
    leader_reg, standby_reg = CollectorRegistry(), CollectorRegistry()
    leader = Scheduler(store, "s1", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=leader_reg, clock=clock)
    standby = Scheduler(store, "s2", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=standby_reg, clock=clock)
    for name in ("n1", "n2"):
        await store.put(keys.node_key(name), node(name))
    await store.put(keys.model_key("a"), model("a", replicas=2))
    await store.put(keys.model_key("big"), model("big", gpus_per_replica=1, gpu_memory_mib=1000))
    await feed_scheduler(store, leader)
    await feed_scheduler(store, standby)
    task = asyncio.create_task(leader.run())
    try:
        await until(lambda: leader.is_leader and len(leader.placements) == 0 and bool(leader.pending))
        await feed_scheduler(store, leader)  # the mirror delivers the leader's own writes
        got = series(leader_reg)
        assert got[("nebula_scheduler_leader", ())] == 1
        assert got[("nebula_scheduler_pending_models", ())] == 1
        assert got[("nebula_scheduler_model_pending", (("model", "big"),))] == 1
        assert got[("nebula_scheduler_nodes", ())] == 2
        assert got[("nebula_scheduler_placements", (("node", "n1"),))] == 1
        assert got[("nebula_scheduler_placements", (("node", "n2"),))] == 1
        assert got[("nebula_scheduler_placement_changes_total", (("change", "write"),))] == 2
        assert got[("nebula_scheduler_placement_changes_total", (("change", "delete"),))] == 0
        assert got[("nebula_scheduler_pass_seconds_count", ())] >= 1
        assert not any(name == "nebula_scheduler_node_gone_seconds" for name, _ in got)

        await store.delete(keys.node_key("n2"))
        await feed_scheduler(store, leader)
        clock.now += 12
        got = series(leader_reg)
        assert got[("nebula_scheduler_node_gone_seconds", (("node", "n2"),))] == 12
        assert got[("nebula_scheduler_nodes", ())] == 1

        await store.put(keys.node_key("n2"), node("n2"))
        await feed_scheduler(store, leader)
        assert not any(name == "nebula_scheduler_node_gone_seconds" for name, _ in series(leader_reg))

        quiet = series(standby_reg)
        assert quiet[("nebula_scheduler_leader", ())] == 0
        assert not any(name in ("nebula_scheduler_nodes", "nebula_scheduler_pending_models",
                                "nebula_scheduler_placements") for name, _ in quiet)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
