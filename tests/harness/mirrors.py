"""Mirrors for tests: follow a prefix of raw values, or build the state a typed mirror would deliver."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from nebula.adapters.watching import Sleep
from nebula.core import keys, records
from nebula.core.records import RecordKind
from nebula.core.store import KeyValue, Store
from nebula.errors import ValidationError
from nebula.services.cluster.mirror import Mirror, MirrorMetrics, MirrorState
from nebula.services.scheduler.scheduler import Scheduler

T = TypeVar("T")


@dataclass(frozen=True)
class _RawKind(RecordKind[KeyValue]):
    """Any value, kept as it is: for store tests that mirror arbitrary bytes (no record, no key check)."""

    def decode(self, key: str, value: bytes) -> KeyValue:
        return KeyValue(key, value, 0, 0)


RAW = _RawKind("raw value", "/", lambda obj: KeyValue("", b"", 0, 0), lambda kv: kv.key)


def follow_raw(store: Store, prefix: str, on_change: Callable[[dict[str, KeyValue]], Awaitable[None] | None],
               *, retry_delay: float = 0.05, max_retry_delay: float = 10.0,
               sleep: Sleep = asyncio.sleep) -> asyncio.Task[Any]:
    """A running mirror of `prefix` that hands `on_change` the whole prefix (key -> KeyValue) on every change."""

    async def deliver(state: MirrorState[KeyValue]) -> None:
        result = on_change(dict(state.records))
        if inspect.isawaitable(result):
            await result

    mirror = Mirror(store, RAW, MirrorMetrics(CollectorRegistry()), prefix=prefix, on_change=deliver,
                    retry_delay=retry_delay, max_retry_delay=max_retry_delay, sleep=sleep)
    return asyncio.create_task(mirror.run())


def mirrored(kind: RecordKind[T], items: Mapping[str, KeyValue] | None = None) -> MirrorState[T]:
    """The state a typed mirror delivers for `items`: valid records by key, refused ones in `bad`."""
    records: dict[str, T] = {}
    bad: dict[str, str] = {}
    for key, kv in (items or {}).items():
        try:
            records[key] = kind.decode(key, kv.value)
        except ValidationError as e:
            bad[key] = str(e)
    return MirrorState(records=records, bad=bad)


async def listing(store: Store, prefix: str) -> dict[str, KeyValue]:
    """The prefix as key -> KeyValue, as a mirror lists it."""
    return {kv.key: kv for kv in (await store.list_prefix(prefix)).items}


async def feed_scheduler(store: Store, sched: Scheduler) -> None:
    """Hand a scheduler what its mirrors would: models, nodes, placements, the elastic records, and its rollouts'
    instances, rollout records and statuses, and drains."""
    ro = sched.rollouts
    ro.on_instances(mirrored(records.INSTANCES, await listing(store, keys.INSTANCES)))
    ro.on_rollouts(mirrored(records.ROLLOUTS, await listing(store, keys.ROLLOUTS)))
    ro.on_statuses(mirrored(records.ROLLOUT_STATUS, await listing(store, keys.ROLLOUT_STATUS)))
    ro.on_drains(mirrored(records.DRAINS, await listing(store, keys.DRAINS)))
    sched.on_models(mirrored(records.MODELS, await listing(store, keys.MODELS)))
    sched.on_nodes(mirrored(records.NODES, await listing(store, keys.NODES)))
    sched.on_placements(mirrored(records.PLACEMENTS, await listing(store, keys.PLACEMENTS)))
    sched.scaler.on_scale(mirrored(records.SCALE, await listing(store, keys.SCALE)))
    sched.scaler.on_load(mirrored(records.LOAD, await listing(store, keys.LOAD)))
    sched.scaler.on_wake(mirrored(records.WAKE, await listing(store, keys.WAKE)))
