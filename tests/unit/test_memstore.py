"""MemoryStore against the shared Store contract, plus the twin's own controls and the watching helpers.

No real timers: leases run on a fake clock and retry sleeps are injected.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.watching import LeaseKeeper, backoff_delay
from nebula.core.store import KeyValue, LeaseLostError, StoreUnavailableError
from tests.harness.mirrors import follow_raw
from tests.store_contract import StoreContract, stop, take, values, wait_until


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class MemoryEnv:
    clock: FakeClock = field(default_factory=FakeClock)
    memory: MemoryStore = field(init=False)
    prefix: str = "/t/"
    retry_delay: float = 0.0

    def __post_init__(self) -> None:
        self.memory = MemoryStore(clock=self.clock)

    @property
    def store(self) -> MemoryStore:
        return self.memory

    async def expire(self, lease: int, ttl: int) -> None:
        self.clock.advance(ttl + 1)
        self.memory.expire_leases()

    async def compact(self, revision: int) -> None:
        self.memory.compact(revision)


@pytest.fixture
def env() -> MemoryEnv:
    return MemoryEnv()


class TestMemoryStoreContract(StoreContract):
    pass


# --- the twin's own controls ------------------------------------------------------------------------


async def test_lease_expires_only_after_ttl_on_the_clock(env: MemoryEnv) -> None:
    store = env.memory
    lease = await store.grant_lease(10)
    await store.put("/k", b"v", lease=lease)
    env.clock.advance(9.9)
    assert store.expire_leases() == []
    assert await store.keepalive(lease) == 10  # pushes the deadline to now + 10
    env.clock.advance(9.9)
    assert await store.get("/k") is not None
    env.clock.advance(0.2)
    # Any operation notices the expiry, as etcd's lessor would have on its own.
    assert await store.get("/k") is None
    assert await store.lease_ttl(lease) == -1


async def test_rewriting_a_key_without_lease_detaches_it(env: MemoryEnv) -> None:
    store = env.memory
    lease = await store.grant_lease(5)
    await store.put("/k", b"v", lease=lease)
    await store.put("/k", b"w")
    await store.revoke_lease(lease)
    kv = await store.get("/k")
    assert kv is not None and kv.value == b"w"


async def test_compact_rejects_future_revision(env: MemoryEnv) -> None:
    with pytest.raises(ValueError):
        env.memory.compact(env.memory.revision + 1)


async def test_unreachable_store_fails_calls_and_pauses_watches(env: MemoryEnv) -> None:
    store = env.memory
    start = store.revision + 1
    await store.put("/w/a", b"1")
    watch = asyncio.create_task(take(store.watch_prefix("/w/", start_revision=start), 2))
    store.set_reachable(False)
    with pytest.raises(StoreUnavailableError):
        await store.put("/w/b", b"2")
    await asyncio.sleep(0)
    assert not watch.done()
    store.set_reachable(True)
    await store.put("/w/b", b"2")
    assert [e.key for e in await watch] == ["/w/a", "/w/b"]


# --- watching helpers --------------------------------------------------------------------------------


def test_backoff_delay_grows_and_caps() -> None:
    delays = [backoff_delay(n, base=0.5, cap=4.0) for n in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_delay(10_000, base=1.0, cap=30.0) == 30.0
    assert backoff_delay(3, base=1.0, cap=30.0, jitter=0.5) == 2.0


@dataclass
class RecordingSleep:
    """An injected sleep that records delays and just yields to the loop."""

    delays: list[float] = field(default_factory=list)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.called.set()
        await asyncio.sleep(0)

    async def until(self, calls: int) -> None:
        while len(self.delays) < calls:
            self.called.clear()
            await asyncio.wait_for(self.called.wait(), 5)


async def test_mirror_retries_with_backoff_while_unreachable(env: MemoryEnv) -> None:
    store = env.memory
    await store.put("/m/a", b"1")
    store.set_reachable(False)
    sleep = RecordingSleep()
    updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
    task = follow_raw(store, "/m/", updates.put_nowait, retry_delay=1.0, max_retry_delay=4.0, sleep=sleep)
    try:
        await sleep.until(4)
        assert sleep.delays[:4] == [1.0, 2.0, 4.0, 4.0]
        store.set_reachable(True)
        assert values(await wait_until(updates, lambda s: True)) == {"/m/a": b"1"}
    finally:
        await stop(task)


async def test_mirror_accepts_async_callback(env: MemoryEnv) -> None:
    store = env.memory
    seen: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()

    async def on_change(state: dict[str, KeyValue]) -> None:
        await seen.put(state)

    task = follow_raw(store, "/m/", on_change)
    try:
        assert await wait_until(seen, lambda s: True) == {}
        await store.put("/m/x", b"1")
        assert values(await wait_until(seen, lambda s: bool(s))) == {"/m/x": b"1"}
    finally:
        await stop(task)


async def test_lease_keeper_retries_while_unreachable_then_regrants(env: MemoryEnv) -> None:
    store = env.memory
    renewed: list[int] = []

    async def on_new_lease(lease: int) -> None:
        renewed.append(lease)

    keeper = LeaseKeeper(store, 9, on_new_lease, retry_delay=0.5)
    first = await keeper.start()
    store.set_reachable(False)
    assert [await keeper.tick() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]  # capped at ttl/3
    assert keeper.lease == first and renewed == []
    env.clock.advance(10)  # cut off longer than the TTL
    store.set_reachable(True)
    assert await keeper.tick() == 3.0
    assert renewed == [keeper.lease] and keeper.lease != first


async def test_lease_keeper_retries_a_failed_callback(env: MemoryEnv) -> None:
    store = env.memory
    calls: list[int] = []

    async def on_new_lease(lease: int) -> None:
        calls.append(lease)
        if len(calls) == 1:
            raise StoreUnavailableError("node record write failed")

    keeper = LeaseKeeper(store, 3, on_new_lease, retry_delay=0.25)
    assert await keeper.tick() == 0.25  # no lease yet: grants, callback fails
    lease = keeper.lease
    assert lease != 0
    assert await keeper.tick() == 1.0
    assert calls == [lease, lease]  # same lease, callback retried
    assert await store.keepalive(lease) == 3


async def test_lease_keeper_run_keeps_lease_alive(env: MemoryEnv) -> None:
    store = env.memory
    ticks = 0

    async def clocked_sleep(delay: float) -> None:
        nonlocal ticks
        ticks += 1
        env.clock.advance(delay)
        if ticks == 10:
            raise asyncio.CancelledError

    async def never(lease: int) -> None:
        raise AssertionError("lease must not be lost")

    keeper = LeaseKeeper(store, 3, never, sleep=clocked_sleep)
    lease = await keeper.start()
    with pytest.raises(asyncio.CancelledError):
        await keeper.run()
    assert env.clock.now == pytest.approx(1000.0 + 10)  # 10 ticks of ttl/3
    assert await store.keepalive(lease) == 3


async def test_lease_keeper_rejects_bad_ttl(env: MemoryEnv) -> None:
    async def cb(lease: int) -> None:
        return None

    with pytest.raises(ValueError):
        LeaseKeeper(env.memory, 0, cb)


async def test_lease_lost_on_put_with_unknown_lease(env: MemoryEnv) -> None:
    with pytest.raises(LeaseLostError):
        await env.memory.put("/k", b"v", lease=12345)
