"""Mirror[T] under hostile records, and the scheduler's fence: what the trust issue found, as tests.

Each of these failed before the typed mirror and the fence existed: one undecodable API key record ended
the gateway's key mirror (a revoked key went on working), and a leader whose lease had expired could
still overwrite the new leader's placements.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys, records
from nebula.core.apikeys import KeyRecord, KeyScope, digest
from nebula.core.model import InstanceStatus, ModelSpec, NodeRecord, Phase, Placement, dumps
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorState
from nebula.services.gateway.auth import Authenticator, Scope
from nebula.services.http.errors import ApiError
from nebula.services.scheduler.scheduler import Scheduler
from tests.harness.mirrors import feed_scheduler

HOSTILE: dict[str, bytes] = {
    "huge": b'{"id": "0123456789abcdef", "name": "x", "digest": "' + b"a" * 64 + b'", "scopes": ["inference"], '
            b'"created": 1' + b"0" * 400 + b"}",
    "deep": b"[" * 50_000,
    "types": b'{"id": 5, "name": ["x"], "gpu_indices": ["a"], "gpus": [{"index": "zero"}]}',
    "utf8": b"\xff\xfe\x00garbage",
    "number": b"1e400",
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key_record(key_id: str, token: str, admin: bool = False) -> KeyRecord:
    scopes = {KeyScope.INFERENCE, KeyScope.ADMIN} if admin else {KeyScope.INFERENCE}
    return KeyRecord(id=key_id, name=key_id[:4], digest=digest(token), scopes=frozenset(scopes))


def knows(auth: Authenticator, token: str) -> bool:
    try:
        return auth.authenticate(Scope.INFERENCE, f"Bearer {token}") is not None
    except ApiError:
        return False


async def until(check: object, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (check() if callable(check) else check):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_garbage_under_the_keys_prefix_does_not_keep_a_revoked_key_working(
        running: list[asyncio.Task[None]], caplog: pytest.LogCaptureFixture) -> None:
    store, registry = MemoryStore(), CollectorRegistry()
    auth = Authenticator([], [], Clock())
    mirror = Mirror(store, records.APIKEYS, MirrorMetrics(registry), on_change=auth.update_keys)
    good = key_record("0123456789abcdef", "tok-good")
    await store.put(keys.apikey_key(good.id), dumps(good.to_dict()))
    running.append(asyncio.create_task(mirror.run()))
    await until(lambda: mirror.live and knows(auth, "tok-good"))
    with caplog.at_level(logging.WARNING, logger="nebula.cluster"):
        for name, raw in HOSTILE.items():
            await store.put(keys.APIKEYS + name, raw)
        await store.put(keys.APIKEYS + b"\xff".decode("utf-8", "surrogateescape"), dumps(good.to_dict()))
        await store.put(keys.APIKEYS + "../../etc", dumps(good.to_dict()))  # a copy under another key
        await until(lambda: len(mirror.bad) == len(HOSTILE) + 2)
        await store.delete(keys.apikey_key(good.id))  # revoked
        await until(lambda: not knows(auth, "tok-good"))
        for name, raw in HOSTILE.items():  # written again: a new revision, named again
            await store.put(keys.APIKEYS + name, raw)
        await until(lambda: registry.get_sample_value("nebula_cluster_bad_records_seen_total",
                                                      {"prefix": keys.APIKEYS}) == 2 * len(HOSTILE) + 2)
    assert mirror.live
    named = [r.getMessage() for r in caplog.records if "ignoring API key" in r.getMessage()]
    assert len(named) == 2 * len(HOSTILE) + 2, "each bad revision is named once, not once per change"
    assert not knows(auth, "tok-good")


async def test_a_failing_consumer_restarts_the_mirror_and_it_recovers(running: list[asyncio.Task[None]]) -> None:
    store, registry = MemoryStore(), CollectorRegistry()
    seen: list[MirrorState[ModelSpec]] = []
    broken = [True]

    def consume(state: MirrorState[ModelSpec]) -> None:
        if broken[0] and "boom" in {s.name for s in state.records.values()}:
            raise RuntimeError("consumer bug")
        seen.append(state)

    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        await asyncio.sleep(0)

    mirror = Mirror(store, records.MODELS, MirrorMetrics(registry), on_change=consume, sleep=sleep)
    running.append(asyncio.create_task(mirror.run()))
    await until(lambda: mirror.live)
    await store.put(keys.model_key("boom"), dumps(ModelSpec(name="boom", source="/m").to_dict()))
    await until(lambda: not mirror.live)
    assert (registry.get_sample_value("nebula_cluster_mirror_restarts_total",
                                      {"prefix": keys.MODELS, "cause": "error"}) or 0) >= 1
    broken[0] = False
    await until(lambda: mirror.live and "boom" in {s.name for s in seen[-1].records.values()})
    assert registry.get_sample_value("nebula_cluster_mirror_live", {"prefix": keys.MODELS}) == 1


async def test_an_unreachable_store_keeps_the_last_view_and_the_mirror_live(running: list[asyncio.Task[None]]) -> None:
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/m").to_dict()))
    mirror = Mirror(store, records.MODELS, MirrorMetrics(CollectorRegistry()), retry_delay=0.01)
    running.append(asyncio.create_task(mirror.run()))
    await until(lambda: mirror.live)
    store.set_reachable(False)
    await asyncio.sleep(0.05)
    assert mirror.live and set(mirror.records) == {keys.model_key("m")}
    store.set_reachable(True)


async def test_a_deleted_instance_leaves_the_routing_view_despite_garbage(running: list[asyncio.Task[None]]) -> None:
    from nebula.services.gateway.replicas import ReplicaTable

    store, table = MemoryStore(), ReplicaTable()
    mirror = Mirror(store, records.INSTANCES, MirrorMetrics(CollectorRegistry()), on_change=table.update)
    st = InstanceStatus(instance="m", model="m", node="n1", phase=Phase.READY, endpoint="http://127.0.0.1:9")
    await store.put(keys.instance_key("m"), dumps(st.to_dict()))
    running.append(asyncio.create_task(mirror.run()))
    await until(lambda: table.pick("m") is not None)
    for name, raw in HOSTILE.items():
        await store.put(keys.INSTANCES + name, raw)
    await store.put(keys.INSTANCES + "x", dumps({**st.to_dict(), "since": 10**400}))
    await store.delete(keys.instance_key("m"))
    await until(lambda: table.pick("m") is None)
    assert mirror.live


async def test_a_deposed_leader_writes_no_placement() -> None:
    """Leader A stalls past its lease; B takes over and places; A's pass, run on its stale view, lands
    nothing (the fence compares A's lease on the leader key in the same transaction)."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.put(keys.node_key("n1"), dumps(NodeRecord(name="n1", address="127.0.0.1", port_min=18000,
                                                          port_max=18100).to_dict()))
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/m").to_dict()))
    a = Scheduler(store, "a", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=CollectorRegistry(), clock=clock)
    b = Scheduler(store, "b", lease_ttl_s=10, node_grace_s=30, resync_s=5, registry=CollectorRegistry(), clock=clock)
    lead_a = asyncio.create_task(a.run())
    await until(lambda: a.is_leader)
    clock.now += 11  # A is paused past its lease: etcd lets it expire and drops the leader key
    store.expire_leases()
    lead_b = asyncio.create_task(b.run())
    try:
        await until(lambda: b.is_leader)
        await feed_scheduler(store, b)
        await b.schedule_once()
        placed = {kv.key: kv.value for kv in (await store.list_prefix(keys.PLACEMENTS)).items}
        assert list(placed) == [keys.placement_key("n1", "m")]
        # A resumes with a view in which the model moved to another port: it would overwrite B's placement.
        await feed_scheduler(store, a)
        a.placements = {}
        a.models = {"m": ModelSpec(name="m", source="/m", replicas=2)}
        await a.schedule_once()
        assert {kv.key: kv.value for kv in (await store.list_prefix(keys.PLACEMENTS)).items} == placed
        assert a.fenced_writes == 1 and a.lost_lead.is_set()
        assert a._fence.guard.key == keys.SCHEDULER_LEADER
        assert not any(isinstance(p, Placement) and p.instance == "m:1" for p in b.placements.values())
    finally:
        lead_a.cancel()
        lead_b.cancel()
        await asyncio.gather(lead_a, lead_b, return_exceptions=True)
