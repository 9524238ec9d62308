"""EtcdStore against a real etcd 3.4: the shared Store contract plus the failure modes that matter.

The etcd server is shared by the session (fixture `etcd_server`): each test works under its own
prefix and leaves the server running and unpaused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nebula.adapters.etcd import EtcdStore
from nebula.core.store import EventType, KeyValue, StoreUnavailableError, WatchEvent
from nebula.errors import TemporaryError
from tests.harness.etcd import EtcdServer
from tests.harness.mirrors import follow_raw
from tests.harness.ports import free_port
from tests.store_contract import WAIT_S, StoreContract, stop, values, wait_until

pytestmark = pytest.mark.etcd

TIMEOUT_S = 1.0


@dataclass
class EtcdEnv:
    etcd: EtcdStore
    prefix: str
    retry_delay: float = 0.05

    @property
    def store(self) -> EtcdStore:
        return self.etcd

    async def expire(self, lease: int, ttl: int) -> None:
        deadline = time.monotonic() + ttl + WAIT_S
        while await self.etcd.lease_ttl(lease) != -1:
            assert time.monotonic() < deadline, f"lease {lease:x} did not expire"
            await asyncio.sleep(0.1)

    async def compact(self, revision: int) -> None:
        await self.etcd.compact(revision)


@pytest.fixture
async def etcd_store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = await EtcdStore.connect([etcd_server.endpoint], timeout=TIMEOUT_S)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def env(etcd_store: EtcdStore) -> EtcdEnv:
    return EtcdEnv(etcd_store, prefix=f"/test/{uuid.uuid4().hex}/")


class TestEtcdStoreContract(StoreContract):
    pass


async def put_when_up(store: EtcdStore, key: str, value: bytes) -> int:
    """A write right after etcd comes back; only connection failures (never applied) are retried."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return await store.put(key, value)
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_watch_survives_etcd_restart_without_losing_events(
    etcd_server: EtcdServer, etcd_store: EtcdStore
) -> None:
    p = f"/test/{uuid.uuid4().hex}/"
    start = (await etcd_store.list_prefix(p)).revision + 1
    seen: list[WatchEvent] = []
    progress = asyncio.Event()

    async def consume() -> None:
        async for event in etcd_store.watch_prefix(p, start_revision=start):
            seen.append(event)
            progress.set()

    async def wait_for_count(n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(seen) < n:
            progress.clear()
            await asyncio.wait_for(progress.wait(), max(0.01, deadline - time.monotonic()))

    watcher = asyncio.create_task(consume())
    try:
        for i in range(5):
            await etcd_store.put(f"{p}before/{i}", b"x")
        await wait_for_count(5)

        await asyncio.to_thread(etcd_server.stop)
        for i in range(3):
            with pytest.raises(TemporaryError):
                await etcd_store.put(f"{p}down/{i}", b"x")
        await asyncio.to_thread(etcd_server.start)

        for i in range(5):
            await put_when_up(etcd_store, f"{p}after/{i}", b"x")
        await wait_for_count(10)
        await asyncio.sleep(0.3)  # room for a duplicate to show up, if resume were wrong
    finally:
        await stop(watcher)
        if not etcd_server.running:
            etcd_server.start()

    expected = [f"{p}before/{i}" for i in range(5)] + [f"{p}after/{i}" for i in range(5)]
    assert [e.key for e in seen] == expected
    assert all(e.type is EventType.PUT for e in seen)
    revisions = [e.mod_revision for e in seen]
    assert revisions == sorted(set(revisions))


async def test_call_times_out_on_frozen_etcd(etcd_server: EtcdServer, etcd_store: EtcdStore) -> None:
    """SIGSTOP: etcd accepts connections and never answers. Calls must fail in ~timeout, not hang,
    and a watch open on the abandoned connection must resume, not die."""
    p = f"/test/{uuid.uuid4().hex}/"
    key = f"{p}frozen"
    start = await etcd_store.put(key, b"1")
    events: asyncio.Queue[WatchEvent] = asyncio.Queue()

    async def consume() -> None:
        async for event in etcd_store.watch_prefix(p, start_revision=start):
            events.put_nowait(event)

    watcher = asyncio.create_task(consume())
    try:
        assert (await asyncio.wait_for(events.get(), WAIT_S)).value == b"1"
        etcd_server.pause()
        try:
            for call in (etcd_store.put(key, b"2"), etcd_store.get(key)):
                began = time.monotonic()
                with pytest.raises(TemporaryError):
                    await call
                elapsed = time.monotonic() - began
                assert elapsed < TIMEOUT_S + 1.0, f"call hung for {elapsed:.1f}s"
        finally:
            etcd_server.resume()
        rev3 = await put_when_up(etcd_store, key, b"3")
        # The timed-out put of b"2" has an unknown outcome: it may never land, or land once etcd wakes
        # up, even after b"3" (it sat in the old connection). What must hold: the watch delivers
        # every change in revision order, b"3" included, and nothing is lost.
        seen = [await asyncio.wait_for(events.get(), WAIT_S)]
        while seen[-1].mod_revision != rev3:
            seen.append(await asyncio.wait_for(events.get(), WAIT_S))
        assert seen[-1].value == b"3"
        assert [e.value for e in seen] in ([b"3"], [b"2", b"3"])
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(set(revisions))
        kv = await etcd_store.get(key)
        assert kv is not None and kv.mod_revision >= rev3
        assert not watcher.done()
    finally:
        await stop(watcher)


async def test_failover_to_next_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = await EtcdStore.connect([dead, etcd_server.endpoint], timeout=TIMEOUT_S)
    try:
        assert store.endpoint == etcd_server.endpoint
        key = f"/test/{uuid.uuid4().hex}/k"
        await store.put(key, b"v")
        kv = await store.get(key)
        assert kv is not None and kv.value == b"v"
    finally:
        await store.close()


async def test_connect_fails_when_no_endpoint_answers() -> None:
    with pytest.raises(StoreUnavailableError):
        await EtcdStore.connect([f"http://127.0.0.1:{free_port()}"], timeout=TIMEOUT_S)


async def test_mirror_prefix_survives_restart(etcd_server: EtcdServer, etcd_store: EtcdStore) -> None:
    p = f"/test/{uuid.uuid4().hex}/"
    await etcd_store.put(f"{p}a", b"1")
    updates: asyncio.Queue[dict[str, KeyValue]] = asyncio.Queue()
    task = follow_raw(etcd_store, p, updates.put_nowait)
    try:
        assert values(await wait_until(updates, lambda s: True)) == {f"{p}a": b"1"}
        await asyncio.to_thread(etcd_server.restart)
        await put_when_up(etcd_store, f"{p}b", b"2")
        await wait_until(updates, lambda s: values(s) == {f"{p}a": b"1", f"{p}b": b"2"})
    finally:
        await stop(task)
        if not etcd_server.running:
            etcd_server.start()


def test_endpoint_must_be_http_host_port() -> None:
    with pytest.raises(ValueError):
        EtcdStore(["https://127.0.0.1"])
    with pytest.raises(ValueError):
        EtcdStore([])


def test_harness_strips_etcd_env_and_owns_the_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # etcd exits at start when ETCD_DATA_DIR conflicts with --data-dir: launching proves it was stripped.
    monkeypatch.setenv("ETCD_DATA_DIR", str(tmp_path / "elsewhere"))
    server = EtcdServer.launch(tmp_path)
    try:
        assert Path(f"/proc/{server.pid}/comm").read_text().strip() == "etcd"
        assert server.data_dir.is_dir()
    finally:
        server.kill()
    assert not server.running
