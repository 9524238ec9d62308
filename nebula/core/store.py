"""The key-value store that holds Nebula's desired and observed state (etcd in production).

Services depend on the `Store` protocol only. `EtcdStore` (nebula.adapters.etcd) is the real one;
`MemoryStore` (nebula.adapters.memstore) is an in-memory twin with the same semantics for fast unit tests.

Errors: every method raises `nebula.errors.TemporaryError` (or a subclass) when the store could not be
reached in time, so callers retry; `CompactedError` when a watch asks for a revision already compacted.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from nebula.errors import TemporaryError


class CompactedError(TemporaryError):
    """The watch's start revision was compacted away: re-list the prefix and watch from the new revision."""


class LeaseLostError(TemporaryError):
    """The lease expired (the client was cut off longer than its TTL): grant a new one and re-register."""


class StoreUnavailableError(TemporaryError):
    """The store did not answer in time (down, frozen, unreachable, leader change): retry later."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    version: int
    lease: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """One change. A DELETE carries an empty value, version 0 and lease 0 (as etcd reports it)."""

    type: EventType
    key: str
    value: bytes
    mod_revision: int
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A consistent listing of a prefix as of store revision `revision`."""

    items: tuple[KeyValue, ...]
    revision: int


@dataclass(frozen=True)
class Guard:
    """A condition on one key that a transaction checks before it writes anything.

    Exactly one of the two is set:
    - `mod_revision`: the key is still as the writer read it (0: the key must not exist);
    - `lease`: the key is held under this lease. Fencing: the scheduler guards its writes with its leader
      key held under its own lease, so a leader whose lease expired (a paused process, a partition) can
      change nothing, even before it notices that it lost.
    """

    key: str
    mod_revision: int | None = None
    lease: int | None = None

    def __post_init__(self) -> None:
        if (self.mod_revision is None) == (self.lease is None):
            raise ValueError("a Guard checks exactly one of mod_revision and lease")


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


class Store(Protocol):
    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str) -> Snapshot: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; returns the new revision."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete `key`; True when it existed."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many were deleted."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Write `key` only if it does not exist (version == 0). True when written."""
        ...

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        """Write `key` only if its mod_revision is still `mod_revision`. True when written."""
        ...

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        """Delete `key` only if its mod_revision is still `mod_revision`. True when deleted."""
        ...

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        """Apply every op in one revision if every guard holds (True), else nothing (False).

        A Put under a lease that no longer exists raises `LeaseLostError` and applies nothing."""
        ...

    def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` from `start_revision` on, in order, none lost across reconnects.

        The iterator resumes by itself after a connection loss (from the last event's mod_revision + 1)
        and raises `CompactedError` when it cannot resume; it ends only when the consumer stops it.
        """
        ...

    async def grant_lease(self, ttl: int) -> int: ...

    async def keepalive(self, lease: int) -> int:
        """Refresh `lease`; returns the remaining TTL. Raises `LeaseLostError` if it expired."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...

    async def close(self) -> None: ...
