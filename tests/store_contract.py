"""One behavioural contract for every `Store`: MemoryStore (unit) and EtcdStore (integration) run it.

A test module subclasses `StoreContract` and provides an `env` fixture implementing `StoreEnv`.
Everything store-specific (making time pass, compacting) goes through the env, so the tests
themselves are identical for the twin and the real thing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest

from nebula.adapters.watching import LeaseKeeper
from nebula.core.store import (
    CompactedError,
    Delete,
    EventType,
    Guard,
    KeyValue,
    LeaseLostError,
    Op,
    Put,
    Snapshot,
    Store,
    WatchEvent,
)
from tests.harness.mirrors import follow_raw

WAIT_S = 10.0  # generous bound for real etcd; the memory store answers at once


class StoreEnv(Protocol):
    @property
    def store(self) -> Store: ...

    @property
    def prefix(self) -> str:
        """A prefix no other test uses (the etcd server is shared by the whole session)."""
        ...

    @property
    def retry_delay(self) -> float:
        """Retry delay for helpers under test: 0 for the twin (no timers), small for etcd."""
        ...

    async def expire(self, lease: int, ttl: int) -> None:
        """Return once `lease` (granted with `ttl`) has expired and its keys are gone."""
        ...

    async def compact(self, revision: int) -> None: ...


async def take(events: AsyncIterator[WatchEvent], n: int, within: float = WAIT_S) -> list[WatchEvent]:
    async def collect() -> list[WatchEvent]:
        out: list[WatchEvent] = []
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(collect(), within)


async def wait_until(
    updates: asyncio.Queue[dict[str, KeyValue]],
    done: Callable[[dict[str, KeyValue]], bool],
    within: float = WAIT_S,
) -> dict[str, KeyValue]:
    """Consume mirror updates until one satisfies `done`."""

    async def loop() -> dict[str, KeyValue]:
        while True:
            state = await updates.get()
            if done(state):
                return state

    return await asyncio.wait_for(loop(), within)


async def stop(task: asyncio.Task[object]) -> None:
    """Cancel `task` and check that it really ends by cancellation (nothing may swallow it)."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=WAIT_S)
    assert done and task.cancelled(), "task did not stop on cancel"


def values(state: dict[str, KeyValue]) -> dict[str, bytes]:
    return {k: kv.value for k, kv in state.items()}


class StoreContract:
    # --- KV -------------------------------------------------------------------------------------

    async def test_put_get(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}a"
        assert await store.get(key) is None
        rev1 = await store.put(key, b"1")
        kv = await store.get(key)
        assert kv == KeyValue(key=key, value=b"1", mod_revision=rev1, version=1, lease=0)
        rev2 = await store.put(key, b"2")
        assert rev2 > rev1
        kv = await store.get(key)
        assert kv is not None and (kv.value, kv.version, kv.mod_revision) == (b"2", 2, rev2)

    async def test_list_prefix_is_sorted_and_exact(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        for name in ("b", "a", "c/d"):
            await store.put(f"{p}x/{name}", name.encode())
        # Siblings that share the prefix's leading bytes must not leak in.
        await store.put(f"{p}x", b"parent")
        last = await store.put(f"{p}x0", b"sibling")
        snap = await store.list_prefix(f"{p}x/")
        assert isinstance(snap, Snapshot)
        assert [kv.key for kv in snap.items] == [f"{p}x/a", f"{p}x/b", f"{p}x/c/d"]
        assert snap.revision >= last
        assert (await store.list_prefix(f"{p}nothing/")).items == ()

    async def test_delete_and_delete_prefix(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        await store.put(f"{p}k", b"v")
        assert await store.delete(f"{p}k") is True
        assert await store.delete(f"{p}k") is False
        assert await store.get(f"{p}k") is None
        for i in range(3):
            await store.put(f"{p}d/{i}", b"v")
        await store.put(f"{p}keep", b"v")
        assert await store.delete_prefix(f"{p}d/") == 3
        assert await store.delete_prefix(f"{p}d/") == 0
        assert [kv.key for kv in (await store.list_prefix(p)).items] == [f"{p}keep"]

    async def test_version_restarts_after_delete(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}v"
        await store.put(key, b"1")
        await store.put(key, b"2")
        await store.delete(key)
        await store.put(key, b"3")
        kv = await store.get(key)
        assert kv is not None and kv.version == 1

    async def test_create_only_if_absent(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}leader"
        assert await store.create(key, b"me") is True
        assert await store.create(key, b"you") is False
        kv = await store.get(key)
        assert kv is not None and kv.value == b"me"
        await store.delete(key)
        assert await store.create(key, b"you") is True

    async def test_replace_compares_mod_revision(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}cas"
        rev = await store.put(key, b"1")
        assert await store.replace(key, b"stale", mod_revision=rev - 1) is False
        assert await store.replace(key, b"2", mod_revision=rev) is True
        assert await store.replace(key, b"3", mod_revision=rev) is False
        kv = await store.get(key)
        assert kv is not None and kv.value == b"2" and kv.version == 2
        # etcd semantics: a missing key has mod_revision 0, so replace(..., 0) creates it.
        assert await store.replace(f"{key}-new", b"x", mod_revision=0) is True

    async def test_delete_if_compares_mod_revision(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}del"
        rev = await store.put(key, b"1")
        assert await store.delete_if(key, mod_revision=rev + 1000) is False
        assert await store.get(key) is not None
        assert await store.delete_if(key, mod_revision=rev) is True
        assert await store.get(key) is None
        assert await store.delete_if(key, mod_revision=0) is False  # nothing left to delete

    async def test_commit_applies_all_or_nothing_in_one_revision(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        rev = await store.put(f"{p}t/a", b"1")
        await store.put(f"{p}t/gone", b"x")
        ops: list[Op] = [Put(f"{p}t/a", b"2"), Put(f"{p}t/b", b"new"), Delete(f"{p}t/gone"), Delete(f"{p}t/never")]
        assert await store.commit([Guard(f"{p}t/a", mod_revision=rev - 1)], ops) is False
        assert values({kv.key: kv for kv in (await store.list_prefix(f"{p}t/")).items}) == {
            f"{p}t/a": b"1", f"{p}t/gone": b"x"}
        assert await store.commit([Guard(f"{p}t/a", mod_revision=rev), Guard(f"{p}t/c", mod_revision=0)], ops)
        snap = await store.list_prefix(f"{p}t/")
        assert values({kv.key: kv for kv in snap.items}) == {f"{p}t/a": b"2", f"{p}t/b": b"new"}
        assert {kv.mod_revision for kv in snap.items} == {snap.revision}  # one revision for the whole commit

    async def test_commit_fenced_by_a_lease(self, env: StoreEnv) -> None:
        """A writer guarded by its hold on a key (a leader key under its lease) can write nothing once it
        lost that key, even if it has not noticed yet."""
        store, p = env.store, env.prefix
        mine = await store.grant_lease(30)
        assert await store.create(f"{p}leader", b"me", lease=mine)
        fence = [Guard(f"{p}leader", lease=mine)]
        assert await store.commit(fence, [Put(f"{p}placed/x", b"1")]) is True
        await store.revoke_lease(mine)  # as an expiry would: the key goes with the lease
        theirs = await store.grant_lease(30)
        assert await store.create(f"{p}leader", b"them", lease=theirs)
        assert await store.commit(fence, [Put(f"{p}placed/x", b"stale"), Delete(f"{p}placed/y")]) is False
        kv = await store.get(f"{p}placed/x")
        assert kv is not None and kv.value == b"1"
        await store.revoke_lease(theirs)

    async def test_commit_put_under_a_lost_lease_raises(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        lease = await store.grant_lease(30)
        await store.revoke_lease(lease)
        with pytest.raises(LeaseLostError):
            await store.commit([], [Put(f"{p}l/a", b"1", lease=lease)])
        assert await store.get(f"{p}l/a") is None

    async def test_a_key_that_is_not_utf8_is_listed_and_can_be_deleted(self, env: StoreEnv) -> None:
        # etcd keys are bytes: a stray one must come through as a string (surrogate-escaped), not an error.
        store, p = env.store, env.prefix
        key = f"{p}raw/" + b"\xff\xfe".decode("utf-8", "surrogateescape")
        await store.put(key, b"v")
        snap = await store.list_prefix(f"{p}raw/")
        assert [kv.key for kv in snap.items] == [key]
        assert await store.delete(key) is True

    # --- watch ----------------------------------------------------------------------------------

    async def test_watch_yields_events_in_order(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        start = (await store.list_prefix(p)).revision + 1
        r1 = await store.put(f"{p}w/a", b"1")
        await store.put(f"{p}other", b"ignored")
        r2 = await store.put(f"{p}w/b", b"2")
        r3 = await store.put(f"{p}w/a", b"3")
        await store.delete_prefix(f"{p}w/")  # one revision, two events
        events = await take(store.watch_prefix(f"{p}w/", start_revision=start), 5)
        assert [(e.type, e.key, e.value) for e in events] == [
            (EventType.PUT, f"{p}w/a", b"1"),
            (EventType.PUT, f"{p}w/b", b"2"),
            (EventType.PUT, f"{p}w/a", b"3"),
            (EventType.DELETE, f"{p}w/a", b""),
            (EventType.DELETE, f"{p}w/b", b""),
        ]
        assert [e.mod_revision for e in events[:3]] == [r1, r2, r3]
        assert events[3].mod_revision == events[4].mod_revision > r3
        assert (events[2].version, events[3].version) == (2, 0)

    async def test_watch_sees_later_writes(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        start = (await store.list_prefix(p)).revision + 1
        watch = asyncio.create_task(take(store.watch_prefix(p, start_revision=start), 3))
        await asyncio.sleep(0)  # let the watch start before the writes (it would see them anyway)
        for i in range(3):
            await store.put(f"{p}{i}", str(i).encode())
        assert [e.key for e in await watch] == [f"{p}0", f"{p}1", f"{p}2"]

    async def test_watch_from_compacted_revision_raises(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        old = await store.put(f"{p}a", b"1")
        await store.put(f"{p}a", b"2")
        latest = await store.put(f"{p}a", b"3")
        await env.compact(latest)
        with pytest.raises(CompactedError):
            await take(store.watch_prefix(p, start_revision=old), 1)
        # Watching from the compaction revision itself is still allowed.
        events = await take(store.watch_prefix(p, start_revision=latest), 1)
        assert events[0].value == b"3"

    # --- mirrors --------------------------------------------------------------------------------

    async def test_mirror_follows_changes(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        await store.put(f"{p}a", b"1")
        updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
        task = follow_raw(store, p, updates.put_nowait, retry_delay=env.retry_delay)
        try:
            assert values(await wait_until(updates, lambda s: True)) == {f"{p}a": b"1"}
            await store.put(f"{p}b", b"2")
            await store.delete(f"{p}a")
            await store.put(f"{p}b", b"3")
            await wait_until(updates, lambda s: values(s) == {f"{p}b": b"3"})
        finally:
            await stop(task)

    async def test_mirror_relists_after_compaction(self, env: StoreEnv) -> None:
        """Compaction between the listing and the watch: the watch fails, the mirror lists again."""
        store, p = env.store, env.prefix
        await store.put(f"{p}a", b"1")
        listings = 0
        original = store.list_prefix

        async def stale_then_compacted(prefix: str) -> Snapshot:
            nonlocal listings
            listings += 1
            snap = await original(prefix)
            if listings == 1:
                await store.put(f"{p}b", b"2")
                await store.delete(f"{p}a")
                await env.compact(await store.put(f"{p}c", b"3"))
            return snap

        setattr(store, "list_prefix", stale_then_compacted)  # noqa: B010 (instance patch on purpose)
        updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
        task = follow_raw(store, p, updates.put_nowait, retry_delay=env.retry_delay)
        try:
            assert values(await wait_until(updates, lambda s: True)) == {f"{p}a": b"1"}  # the stale one
            state = await wait_until(updates, lambda s: values(s) == {f"{p}b": b"2", f"{p}c": b"3"})
            assert listings == 2
            # Still following after the re-list.
            await store.put(f"{p}d", b"4")
            state = await wait_until(updates, lambda s: f"{p}d" in s)
            assert sorted(state) == [f"{p}b", f"{p}c", f"{p}d"]
        finally:
            await stop(task)

    # --- leases ---------------------------------------------------------------------------------

    async def test_lease_keepalive_and_revoke(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}leased"
        lease = await store.grant_lease(10)
        await store.put(key, b"v", lease=lease)
        kv = await store.get(key)
        assert kv is not None and kv.lease == lease
        assert await store.keepalive(lease) == 10
        await store.revoke_lease(lease)
        assert await store.get(key) is None
        await store.revoke_lease(lease)  # idempotent
        with pytest.raises(LeaseLostError):
            await store.keepalive(lease)

    async def test_expired_lease_deletes_keys_and_keepalive_fails(self, env: StoreEnv) -> None:
        store, p = env.store, env.prefix
        start = (await store.list_prefix(p)).revision + 1
        lease = await store.grant_lease(2)
        await store.put(f"{p}n/1", b"a", lease=lease)
        await store.put(f"{p}n/2", b"b", lease=lease)
        await env.expire(lease, 2)
        assert (await store.list_prefix(f"{p}n/")).items == ()
        with pytest.raises(LeaseLostError):
            await store.keepalive(lease)
        with pytest.raises(LeaseLostError):
            await store.put(f"{p}n/3", b"c", lease=lease)
        events = await take(store.watch_prefix(f"{p}n/", start_revision=start), 4)
        assert [e.type for e in events[2:]] == [EventType.DELETE, EventType.DELETE]
        assert events[2].mod_revision == events[3].mod_revision  # one revocation, one revision

    async def test_lease_keeper_regrants_after_loss(self, env: StoreEnv) -> None:
        store, key = env.store, f"{env.prefix}node"
        renewed: list[int] = []

        async def on_new_lease(lease: int) -> None:
            renewed.append(lease)
            await store.put(key, b"record", lease=lease)

        keeper = LeaseKeeper(store, 2, on_new_lease)
        first = await keeper.start()
        await store.put(key, b"record", lease=first)
        assert await keeper.tick() == pytest.approx(2 / 3)  # healthy: keepalive, no callback
        assert renewed == []
        await env.expire(first, 2)
        assert await store.get(key) is None
        await keeper.tick()
        assert renewed == [keeper.lease] and keeper.lease not in (0, first)
        kv = await store.get(key)
        assert kv is not None and kv.lease == keeper.lease
        await keeper.revoke()
        assert keeper.lease == 0 and await store.get(key) is None


__all__ = ["StoreContract", "StoreEnv", "stop", "take", "values", "wait_until"]
