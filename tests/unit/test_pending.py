"""PendingReporter: the leader's pending reasons in the store, written on change, gone with the condition."""

from __future__ import annotations

import json

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.status import ModelStatus
from nebula.services.cluster.writes import ClusterWrites, Fence
from nebula.services.scheduler.pending import PendingReporter


async def reasons(store: MemoryStore) -> dict[str, str]:
    snap = await store.list_prefix(keys.MODEL_STATUS)
    return {s.model: s.pending for s in (ModelStatus.from_dict(json.loads(kv.value)) for kv in snap.items)}


async def lead(store: MemoryStore) -> Fence:
    """Take the scheduler's leader key under a lease of our own, as an elected leader holds it."""
    lease = await store.grant_lease(10)
    assert await store.create(keys.SCHEDULER_LEADER, b"s1", lease=lease)
    return Fence(lease)


async def test_written_on_change_kept_since_and_deleted_when_placed() -> None:
    store, now = MemoryStore(), [10.0]
    lease = await lead(store)
    rep = PendingReporter(store, ClusterWrites(store), clock=lambda: now[0])
    await rep.sync({"big": "needs 40 GiB on one GPU; largest free is 22 GiB on node-b"}, lease)
    kv = await store.get(keys.model_status_key("big"))
    assert kv is not None and kv.lease == lease.lease
    now[0] = 20.0
    await rep.sync({"big": "needs 40 GiB on one GPU; largest free is 30 GiB on node-c"}, lease)
    kv = await store.get(keys.model_status_key("big"))
    assert kv is not None and ModelStatus.from_dict(json.loads(kv.value)).since == 10.0
    revision = (await store.list_prefix(keys.MODEL_STATUS)).revision
    await rep.sync({"big": "needs 40 GiB on one GPU; largest free is 30 GiB on node-c"}, lease)
    assert (await store.list_prefix(keys.MODEL_STATUS)).revision == revision, "an unchanged reason is not rewritten"
    await rep.sync({}, lease)
    assert await reasons(store) == {}


async def test_a_new_leader_drops_reasons_it_does_not_confirm() -> None:
    store = MemoryStore()
    await store.put(keys.model_status_key("old"), b'{"model": "old", "pending": "stale"}')
    await store.put(keys.model_status_key("still"), b'{"model": "still", "pending": "before"}')
    rep = PendingReporter(store, ClusterWrites(store))
    rep.reset()
    await rep.sync({"still": "no live nodes"}, await lead(store))
    assert await reasons(store) == {"still": "no live nodes"}


async def test_a_deposed_leader_writes_no_reason() -> None:
    store = MemoryStore()
    fence = await lead(store)
    rep = PendingReporter(store, ClusterWrites(store))
    assert await rep.sync({"a": "no GPU"}, fence)
    await store.revoke_lease(fence.lease)  # its lease expired: the leader key and its reasons are gone
    await store.create(keys.SCHEDULER_LEADER, b"s2", lease=await store.grant_lease(10))
    assert await rep.sync({"b": "no GPU"}, fence) is False
    assert await reasons(store) == {}


def test_nebula_list_shows_the_reason() -> None:
    from nebula.cli.views import model_rows

    reason = "needs 40 GiB on one GPU; largest free is 22 GiB on node-b"
    spec = {"replicas": 2, "task": "generate"}
    none_placed = {"name": "big", "spec": spec, "ready": 0, "pending_reason": reason, "instances": []}
    assert model_rows([none_placed]) == [["big", "generate", "0/2", "pending", "-", "-",
                                          f"waiting for placement: {reason}"]]
    one_placed = none_placed | {"pending_reason": f"1 of 2 replicas placed; the others: {reason}", "instances": [
        {"instance": "big", "phase": "ready", "node": "node-c", "message": "", "progress": None}]}
    rows = model_rows([one_placed])
    assert rows[1] == ["big", "generate", "0/2", "pending", "-", "-",
                       f"waiting for placement: 1 of 2 replicas placed; the others: {reason}"]
