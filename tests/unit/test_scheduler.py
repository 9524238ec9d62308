"""The scheduler's passes and election against the in-memory store, on a controllable clock."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.model import ModelSpec, NodeRecord, Placement, dumps, loads
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.mirrors import feed_scheduler
from tests.unit.fake_engine import until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def placements(store: MemoryStore) -> dict[str, str]:
    snap = await store.list_prefix(keys.PLACEMENTS)
    return {p.instance: p.node for p in (Placement.from_dict(loads(kv.value)) for kv in snap.items)}


def node(name: str) -> bytes:
    return dumps(NodeRecord(name=name, address="127.0.0.1", port_min=18000, port_max=18100).to_dict())


async def test_places_moves_after_grace_only() -> None:
    store, clock = MemoryStore(), Clock()
    sched = Scheduler(store, "s1", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=CollectorRegistry(),
                      clock=clock)
    await store.put(keys.node_key("n1"), node("n1"))
    await store.put(keys.node_key("n2"), node("n2"))
    await store.put(keys.model_key("a"), dumps(ModelSpec.from_dict({"name": "a", "source": "/m",
                                                                    "replicas": 2}).to_dict()))
    await feed_scheduler(store, sched)
    await sched.schedule_once()
    assert sorted((await placements(store)).values()) == ["n1", "n2"]
    await feed_scheduler(store, sched)
    before = await placements(store)

    await store.delete(keys.node_key("n2"))
    await feed_scheduler(store, sched)
    clock.now += 29
    await sched.schedule_once()
    assert await placements(store) == before  # a blip shorter than the grace moves nothing
    clock.now += 2
    await feed_scheduler(store, sched)
    await sched.schedule_once()
    assert sorted((await placements(store)).values()) == ["n1", "n1"]


def two_schedulers(store: MemoryStore, lease_ttl_s: int) -> tuple[Scheduler, Scheduler]:
    def make(name: str) -> Scheduler:
        return Scheduler(store, name, lease_ttl_s=lease_ttl_s, node_grace_s=30, resync_s=5,
                         registry=CollectorRegistry())

    return make("s1"), make("s2")


async def stop(*tasks: asyncio.Task[None]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_only_one_scheduler_leads() -> None:
    store = MemoryStore()
    s1, s2 = two_schedulers(store, lease_ttl_s=3)
    t1 = asyncio.create_task(s1.run())
    await asyncio.sleep(0.05)
    t2 = asyncio.create_task(s2.run())
    await asyncio.sleep(0.05)
    try:
        assert s1.is_leader and not s2.is_leader
        kv = await store.get(keys.SCHEDULER_LEADER)
        assert kv is not None and kv.value == b"s1"
    finally:
        await stop(t1, t2)


async def test_a_standby_takes_over_as_soon_as_the_leader_key_goes() -> None:
    """The standby watches the leader key: with a 30 s lease its fallback poll would take 30 s, the watch
    makes the handover immediate once the leader's lease ends (here: revoked by a clean stop)."""
    store = MemoryStore()
    s1, s2 = two_schedulers(store, lease_ttl_s=30)
    t1 = asyncio.create_task(s1.run())
    await until(lambda: s1.is_leader)
    t2 = asyncio.create_task(s2.run())
    try:
        await asyncio.sleep(0.05)
        assert not s2.is_leader
        await stop(t1)
        await until(lambda: s2.is_leader, within_s=2.0)
        kv = await store.get(keys.SCHEDULER_LEADER)
        assert kv is not None and kv.value == b"s2"
    finally:
        await stop(t1, t2)
