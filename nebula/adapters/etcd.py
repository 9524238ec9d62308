"""`EtcdStore`: the `Store` protocol on etcd 3.4+, over aetcd's gRPC channel and generated stubs.

aetcd (unmaintained) is kept behind the etcd* adapters: we use its channel setup and protobuf stubs and
build the requests ourselves, so that every call carries a deadline, every failure becomes one of
our exception types, and watches resume without losing events (see /work/shared/notes/etcd.md).

- Every call has a gRPC deadline of `timeout` seconds plus an asyncio guard; a timeout or an
  unreachable server raises StoreUnavailableError (a TemporaryError) and moves to the next endpoint
  with a fresh channel, so the next call does not wait out gRPC's reconnect backoff on a dead member.
  Calls are never retried internally: a create that timed out may have been applied.
- gRPC keepalive pings every 10 s (etcd rejects < 5 s) so a frozen member breaks open watch streams.
- watch_prefix resumes from the last delivered event's mod_revision + 1, never the header revision.
- One EtcdStore per event loop (gRPC aio channels are bound to the loop that created them).
- https:// endpoints use TLS (`EtcdSecurity`: CA, client certificate); a user and password authenticate
  each new channel, and a call refused for an expired token (UNAUTHENTICATED) re-authenticates and is
  sent again once: etcd rejected it before applying it.

The channel, failover and auth live in etcd_connection, the resuming watch in etcd_watch, and the
key and error conversions in etcd_wire; this module holds the KV, transaction and lease calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aetcd import rpc

from nebula.adapters.etcd_connection import EtcdConnection, EtcdSecurity
from nebula.adapters.etcd_watch import resuming_watch
from nebula.adapters.etcd_wire import key_bytes, key_start, range_end, to_kv
from nebula.core.store import Guard, KeyValue, LeaseLostError, Op, Put, Snapshot, StoreUnavailableError, WatchEvent

_TXN_MOD = 2  # etcdserverpb.Compare.CompareTarget.MOD
_TXN_VERSION = 0  # etcdserverpb.Compare.CompareTarget.VERSION
_TXN_LEASE = 4  # etcdserverpb.Compare.CompareTarget.LEASE
_TXN_EQUAL = 0  # etcdserverpb.Compare.CompareResult.EQUAL


class EtcdStore:
    """The production `Store`. Build it with `await EtcdStore.connect(endpoints, timeout=...)`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        watch_retry_delay: float = 0.2,
        watch_max_retry_delay: float = 2.0,
        security: EtcdSecurity | None = None,
    ) -> None:
        self._etcd = EtcdConnection(endpoints, timeout=timeout, security=security)
        self._watch_retry_delay = watch_retry_delay
        self._watch_max_retry_delay = watch_max_retry_delay

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 (the store's per-call timeout, not a deadline for connect)
        security: EtcdSecurity | None = None,
    ) -> EtcdStore:
        """Create a store and check that some endpoint answers (tries each one once)."""
        store = cls(endpoints, timeout=timeout, security=security)
        last: StoreUnavailableError | None = None
        for _ in endpoints:
            try:
                await store.ping()
                return store
            except StoreUnavailableError as exc:
                last = exc
        await store.close()
        assert last is not None
        raise last

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to."""
        return self._etcd.endpoint

    def _kw(self, client: Any) -> dict[str, Any]:
        return {"timeout": self._etcd.timeout, "metadata": client.metadata}

    async def ping(self) -> None:
        """One round trip that needs no permission on any key (etcd's Status), so a user whose role covers
        only Nebula's prefix can still be checked at connect time."""

        async def op(c: Any) -> Any:
            return await c.maintenancestub.Status(rpc.StatusRequest(), **self._kw(c))

        await self._etcd.call(op)

    # --- KV -------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        async def op(c: Any) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(key=key_bytes(key)), **self._kw(c))

        response = await self._etcd.call(op)
        return to_kv(response.kvs[0]) if response.kvs else None

    async def list_prefix(self, prefix: str) -> Snapshot:
        raw = key_bytes(prefix)
        request = rpc.RangeRequest(key=key_start(raw), range_end=range_end(raw))

        async def op(c: Any) -> Any:
            return await c.kvstub.Range(request, **self._kw(c))

        response = await self._etcd.call(op)
        # etcd returns a range sorted by key and all of it (limit 0) at header.revision.
        return Snapshot(items=tuple(to_kv(kv) for kv in response.kvs), revision=int(response.header.revision))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=key_bytes(key), value=value, lease=lease)

        async def op(c: Any) -> Any:
            return await c.kvstub.Put(request, **self._kw(c))

        return int((await self._etcd.call(op)).header.revision)

    async def delete(self, key: str) -> bool:
        return await self._delete_range(rpc.DeleteRangeRequest(key=key_bytes(key))) > 0

    async def delete_prefix(self, prefix: str) -> int:
        raw = key_bytes(prefix)
        return await self._delete_range(rpc.DeleteRangeRequest(key=key_start(raw), range_end=range_end(raw)))

    async def _delete_range(self, request: Any) -> int:
        async def op(c: Any) -> Any:
            return await c.kvstub.DeleteRange(request, **self._kw(c))

        return int((await self._etcd.call(op)).deleted)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        raw = key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_VERSION, result=_TXN_EQUAL, version=0)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease))
        response = await self._txn(compare, put)
        return bool(response.succeeded)

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        raw = key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=mod_revision)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease))
        response = await self._txn(compare, put)
        return bool(response.succeeded)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        raw = key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=mod_revision)
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw))
        response = await self._txn(compare, delete)
        # A missing key has mod_revision 0: the compare can succeed and still delete nothing.
        return bool(response.succeeded) and int(response.responses[0].response_delete_range.deleted) > 0

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        compares = [
            rpc.Compare(key=key_bytes(g.key), target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=g.mod_revision)
            if g.mod_revision is not None
            else rpc.Compare(key=key_bytes(g.key), target=_TXN_LEASE, result=_TXN_EQUAL, lease=g.lease)
            for g in guards
        ]
        requests = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=key_bytes(op.key), value=op.value, lease=op.lease))
            if isinstance(op, Put)
            else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key_bytes(op.key)))
            for op in ops
        ]
        return bool((await self._txn(compares, *requests)).succeeded)

    async def _txn(self, compare: Any, *success: Any) -> Any:
        request = rpc.TxnRequest(compare=compare if isinstance(compare, list) else [compare], success=list(success),
                                 failure=[])

        async def op(c: Any) -> Any:
            return await c.kvstub.Txn(request, **self._kw(c))

        return await self._etcd.call(op)

    async def compact(self, revision: int) -> None:
        """Drop history below `revision` (ops/tests; services never compact)."""

        async def op(c: Any) -> Any:
            return await c.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True), **self._kw(c))

        await self._etcd.call(op)

    # --- watch ----------------------------------------------------------------------------------

    def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        return resuming_watch(self._etcd, prefix, start_revision=start_revision, retry_delay=self._watch_retry_delay,
                              max_retry_delay=self._watch_max_retry_delay)

    # --- leases ---------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), **self._kw(c))

        response = await self._etcd.call(op)
        if response.error:
            raise StoreUnavailableError(f"etcd refused the lease: {response.error}")
        return int(response.ID)

    async def keepalive(self, lease: int) -> int:
        async def op(c: Any) -> Any:
            call = c.leasestub.LeaseKeepAlive(**self._kw(c))
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                return await anext(call.__aiter__(), None)
            finally:
                call.cancel()

        response = await self._etcd.call(op)
        if response is None:
            raise StoreUnavailableError("etcd closed the keepalive stream")
        if int(response.TTL) <= 0:
            raise LeaseLostError(f"lease {lease:x} expired")
        return int(response.TTL)

    async def lease_ttl(self, lease: int) -> int:
        """Remaining TTL in seconds, -1 when the lease does not exist."""

        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease), **self._kw(c))

        return int((await self._etcd.call(op)).TTL)

    async def revoke_lease(self, lease: int) -> None:
        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), **self._kw(c))

        with contextlib.suppress(LeaseLostError):  # already gone: revoking is idempotent
            await self._etcd.call(op)

    async def close(self) -> None:
        await self._etcd.close()
