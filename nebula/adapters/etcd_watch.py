"""Watching an etcd prefix so that a broken stream resumes where it left off, losing and splitting no revision."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from aetcd import rpc

from nebula.adapters.etcd_connection import Conn, EtcdConnection, cancellations, cancelled_by_caller
from nebula.adapters.etcd_wire import key_bytes, key_start, range_end, to_event, translate
from nebula.adapters.timeouts import timeout
from nebula.adapters.watching import backoff_delay
from nebula.core.store import CompactedError, StoreUnavailableError, WatchEvent

# The store's name, so that log filters on it (journal field LOGGER) keep matching after the split.
log = logging.getLogger("nebula.adapters.etcd")


async def resuming_watch(
    etcd: EtcdConnection, prefix: str, *, start_revision: int, retry_delay: float, max_retry_delay: float
) -> AsyncIterator[WatchEvent]:
    next_rev = start_revision
    failures = 0

    async def pause() -> None:
        await asyncio.sleep(backoff_delay(failures, base=retry_delay, cap=max_retry_delay,
                                          jitter=random.random() * 0.2))

    while True:
        try:
            conn = await etcd.current()
        except StoreUnavailableError as exc:  # authenticating a new channel failed: try again later
            log.warning("etcd watch on %r cannot connect (%s); resuming at %d", prefix, exc, next_rev)
            failures += 1
            await pause()
            continue
        try:
            async for batch in _watch_stream(etcd, conn, prefix, next_rev):
                failures = 0
                for event in batch:
                    yield event
                # Only after the whole revision went out: a resume never splits one.
                next_rev = batch[-1].mod_revision + 1
            log.warning("etcd watch on %r ended by the server; resuming at %d", prefix, next_rev)
        except StoreUnavailableError as exc:
            log.warning("etcd watch on %r broke (%s); resuming at %d", prefix, exc, next_rev)
            await etcd.failover(conn)
        failures += 1
        await pause()


async def _watch_stream(
    etcd: EtcdConnection, conn: Conn, prefix: str, start_revision: int
) -> AsyncIterator[list[WatchEvent]]:
    """One Watch RPC: yields each response's events; raises when the stream breaks."""
    stopping_already = cancellations()
    raw = key_bytes(prefix)
    create = rpc.WatchCreateRequest(key=key_start(raw), range_end=range_end(raw), start_revision=start_revision)
    # No deadline on the stream itself (it lives for ever); keepalive detects a dead peer.
    call = rpc.WatchStub(conn.client.channel).Watch(metadata=conn.client.metadata)
    try:
        responses = call.__aiter__()
        try:
            async with timeout(etcd.timeout):
                await call.write(rpc.WatchRequest(create_request=create))
                created = await anext(responses, None)
        except TimeoutError as exc:
            raise StoreUnavailableError(f"etcd {conn.endpoint}: watch not created in {etcd.timeout}s") from exc
        _check_watch_response(created, start_revision)
        async for response in responses:
            _check_watch_response(response, start_revision)
            if response.events:
                yield [to_event(e) for e in response.events]
    except rpc.AioRpcError as exc:
        raise translate(exc) from exc
    except asyncio.CancelledError:
        if cancelled_by_caller(since=stopping_already):
            raise
        raise StoreUnavailableError(f"etcd {conn.endpoint}: watch connection closed") from None
    finally:
        call.cancel()


def _check_watch_response(response: Any, start_revision: int) -> None:
    if response is None:
        raise StoreUnavailableError("etcd closed the watch stream")
    if response.compact_revision:
        raise CompactedError(f"watch from revision {start_revision}: compacted up to {response.compact_revision}")
    if response.canceled:
        # Cancelled by the server for a reason other than compaction (e.g. leader lost).
        raise StoreUnavailableError(f"etcd cancelled the watch: {response.cancel_reason}")
