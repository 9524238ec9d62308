"""`MemoryStore`: an in-process `Store` with etcd's semantics, for fast unit tests of services.

Matches etcd 3.4 where services can observe it: one global revision bumped by every write that
changes something (a failed txn or a delete of nothing does not), per-key version reset on delete,
txn compares against mod_revision 0 / version 0 for a missing key, a lease revocation deletes all its
keys (sorted) in one revision, watches from a revision inclusive, `CompactedError` for a watch that
starts (or falls) below the compaction revision.

Time is an injectable clock: leases expire once `clock() >= deadline`, checked at every operation and
by `expire_leases()`. `set_reachable(False)` simulates an outage: calls raise StoreUnavailableError
and watches pause (they resume by themselves, as EtcdStore's do).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from nebula.core.store import (
    CompactedError,
    EventType,
    Guard,
    KeyValue,
    LeaseLostError,
    Op,
    Put,
    Snapshot,
    StoreUnavailableError,
    WatchEvent,
)

Clock = Callable[[], float]


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._revision = 1  # etcd starts at 1 with an empty keyspace
        self._compacted = 0
        self._data: dict[str, KeyValue] = {}
        self._events: list[WatchEvent] = []  # every change, mod_revision ascending
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._reachable = True
        self._changed = asyncio.Event()

    # --- test controls (not part of Store) -------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    def set_reachable(self, reachable: bool) -> None:
        self._reachable = reachable
        self._wake_watchers()

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose deadline has passed; returns their ids."""
        now = self._clock()
        expired = [lease_id for lease_id, lease in self._leases.items() if now >= lease.deadline]
        for lease_id in expired:
            self._drop_lease(lease_id)
        return expired

    def compact(self, revision: int) -> None:
        """Forget history below `revision`: watches starting below it raise CompactedError."""
        if revision > self._revision:
            raise ValueError(f"cannot compact to future revision {revision} (current {self._revision})")
        if revision <= self._compacted:
            return
        self._compacted = revision
        cut = bisect.bisect_left(self._events, revision, key=lambda e: e.mod_revision)
        del self._events[:cut]
        self._wake_watchers()

    async def lease_ttl(self, lease: int) -> int:
        """Remaining TTL in whole seconds, -1 when the lease does not exist (etcd's TimeToLive)."""
        self._enter()
        state = self._leases.get(lease)
        if state is None:
            return -1
        return max(0, int(state.deadline - self._clock()))

    # --- Store ------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._enter()
        return self._data.get(key)

    async def list_prefix(self, prefix: str) -> Snapshot:
        self._enter()
        items = tuple(self._data[k] for k in sorted(self._data) if k.startswith(prefix))
        return Snapshot(items=items, revision=self._revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._enter()
        self._put(key, value, lease)
        return self._revision

    async def delete(self, key: str) -> bool:
        self._enter()
        return self._delete_keys([key]) > 0

    async def delete_prefix(self, prefix: str) -> int:
        self._enter()
        return self._delete_keys(sorted(k for k in self._data if k.startswith(prefix)))

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        self._enter()
        if key in self._data:
            return False
        self._put(key, value, lease)
        return True

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        self._enter()
        if self._mod_revision(key) != mod_revision:
            return False
        self._put(key, value, lease)
        return True

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        self._enter()
        if self._mod_revision(key) != mod_revision:
            return False
        return self._delete_keys([key]) > 0

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        # Like etcd, 0 (or less) means "from the next change on".
        next_rev = start_revision if start_revision > 0 else self._revision + 1
        while True:
            wakeup = self._changed
            if self._reachable:
                if next_rev < self._compacted:
                    raise CompactedError(f"revision {next_rev} compacted (compacted up to {self._compacted})")
                batch = self._events_from(next_rev)
                if batch:
                    next_rev = batch[-1].mod_revision + 1
                    for event in batch:
                        if event.key.startswith(prefix):
                            yield event
                    continue
            await wakeup.wait()

    async def grant_lease(self, ttl: int) -> int:
        self._enter()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl=ttl, deadline=self._clock() + ttl)
        return lease_id

    async def keepalive(self, lease: int) -> int:
        self._enter()
        state = self._leases.get(lease)
        if state is None:
            raise LeaseLostError(f"lease {lease:x} not found")
        state.deadline = self._clock() + state.ttl
        return state.ttl

    async def revoke_lease(self, lease: int) -> None:
        self._enter()
        if lease in self._leases:
            self._drop_lease(lease)

    async def close(self) -> None:
        self._wake_watchers()

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        self._enter()
        for g in guards:
            kv = self._data.get(g.key)
            held = (kv.mod_revision if kv else 0) if g.mod_revision is not None else (kv.lease if kv else 0)
            if held != (g.mod_revision if g.mod_revision is not None else g.lease):
                return False
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseLostError(f"lease {op.lease:x} not found")
        if not ops:
            return True
        # One revision for the whole transaction, as etcd gives it.
        events: list[WatchEvent] = []
        self._revision += 1
        for op in ops:
            old = self._data.get(op.key)
            if old is not None and old.lease in self._leases:
                self._leases[old.lease].keys.discard(op.key)
            if isinstance(op, Put):
                if op.lease:
                    self._leases[op.lease].keys.add(op.key)
                kv = KeyValue(key=op.key, value=op.value, mod_revision=self._revision,
                              version=old.version + 1 if old else 1, lease=op.lease)
                self._data[op.key] = kv
                events.append(WatchEvent(EventType.PUT, op.key, op.value, self._revision, version=kv.version,
                                         lease=op.lease))
            elif old is not None:
                del self._data[op.key]
                events.append(WatchEvent(EventType.DELETE, op.key, b"", self._revision))
        if not events:  # deletes of nothing: etcd bumps the revision only for a change
            self._revision -= 1
            return True
        self._record(events)
        return True

    # --- internals ----------------------------------------------------------------------------------

    def _enter(self) -> None:
        if not self._reachable:
            raise StoreUnavailableError("memory store set unreachable")
        self.expire_leases()

    def _mod_revision(self, key: str) -> int:
        kv = self._data.get(key)
        return kv.mod_revision if kv else 0

    def _events_from(self, revision: int) -> list[WatchEvent]:
        start = bisect.bisect_left(self._events, revision, key=lambda e: e.mod_revision)
        return self._events[start:]

    def _put(self, key: str, value: bytes, lease: int) -> None:
        if lease and lease not in self._leases:
            raise LeaseLostError(f"lease {lease:x} not found")
        old = self._data.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        if lease:
            self._leases[lease].keys.add(key)
        self._revision += 1
        kv = KeyValue(
            key=key,
            value=value,
            mod_revision=self._revision,
            version=old.version + 1 if old else 1,
            lease=lease,
        )
        self._data[key] = kv
        self._record([WatchEvent(EventType.PUT, key, value, self._revision, version=kv.version, lease=lease)])

    def _delete_keys(self, keys: list[str]) -> int:
        """Delete the existing ones among `keys` in one revision; returns how many."""
        present = [k for k in keys if k in self._data]
        if not present:
            return 0
        self._revision += 1
        for key in present:
            kv = self._data.pop(key)
            if kv.lease in self._leases:
                self._leases[kv.lease].keys.discard(key)
        self._record([WatchEvent(EventType.DELETE, k, b"", self._revision) for k in present])
        return len(present)

    def _drop_lease(self, lease: int) -> None:
        state = self._leases.pop(lease)
        self._delete_keys(sorted(state.keys))

    def _record(self, events: list[WatchEvent]) -> None:
        self._events.extend(events)
        self._wake_watchers()

    def _wake_watchers(self) -> None:
        # A fresh Event per change: every waiting watcher wakes once and re-reads the history.
        wakeup, self._changed = self._changed, asyncio.Event()
        wakeup.set()
