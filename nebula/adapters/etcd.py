"""`EtcdStore`: the `Store` protocol on etcd 3.4+, over aetcd's gRPC channel and generated stubs.

aetcd (unmaintained) is kept behind this module: we use its channel setup and protobuf stubs and
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from nebula.adapters.watching import backoff_delay
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
from nebula.errors import PermanentError

log = logging.getLogger(__name__)

T = TypeVar("T")

_KEEPALIVE_TIME_MS = 10_000
_KEEPALIVE_TIMEOUT_MS = 5_000
# gRPC's default reconnect backoff grows to 120 s: far too slow to notice etcd coming back.
_MAX_RECONNECT_BACKOFF_MS = 2_000
# The asyncio guard fires only if gRPC's own deadline somehow did not.
_GUARD_MARGIN_S = 0.5

# grpc ships no type stubs; aetcd.rpc re-exports what we need from it (typed Any, kept in here).
_TEMPORARY_CODES = frozenset(
    {
        rpc.StatusCode.UNAVAILABLE,
        rpc.StatusCode.DEADLINE_EXCEEDED,
        rpc.StatusCode.CANCELLED,
        rpc.StatusCode.RESOURCE_EXHAUSTED,
        rpc.StatusCode.ABORTED,
        rpc.StatusCode.UNKNOWN,
        # gRPC core reports a connection torn down mid-call (e.g. etcd restarting) as INTERNAL.
        rpc.StatusCode.INTERNAL,
    }
)
# Codes that mean "this member may be gone": switch endpoint.
_FAILOVER_CODES = frozenset({rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.INTERNAL})
# etcd's "invalid auth token": the channel's token expired (etcd restarted, or the token's TTL ran out).
_REAUTH_CODE = rpc.StatusCode.UNAUTHENTICATED

_TXN_MOD = 2  # etcdserverpb.Compare.CompareTarget.MOD
_TXN_VERSION = 0  # etcdserverpb.Compare.CompareTarget.VERSION
_TXN_LEASE = 4  # etcdserverpb.Compare.CompareTarget.LEASE
_TXN_EQUAL = 0  # etcdserverpb.Compare.CompareResult.EQUAL
_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE


class EtcdRequestError(PermanentError):
    """etcd rejected the request itself (invalid argument, permission...): retrying cannot help."""


@dataclass(frozen=True)
class EtcdSecurity:
    """TLS material (PEM bytes, read by the caller) and credentials. TLS is on for https:// endpoints."""

    ca: bytes | None = None  # None: the system's CAs
    cert: bytes | None = None  # client certificate chain, with `key`, for etcd's --client-cert-auth
    key: bytes | None = None
    user: str = ""
    password: str = ""


@dataclass(frozen=True)
class _Client:
    """One gRPC channel to one endpoint, its stubs, and the auth token every call carries (if any)."""

    channel: Any
    metadata: tuple[tuple[str, str], ...] | None
    kvstub: Any
    leasestub: Any
    maintenancestub: Any

    async def close(self) -> None:
        await self.channel.close()


@dataclass(frozen=True)
class _Conn:
    """One client and the generation it belongs to."""

    client: _Client
    generation: int
    endpoint: str


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"etcd endpoint must look like http://host:port or https://host:port, got {endpoint!r}")
    return parts.scheme, parts.hostname, parts.port


def _range_end(prefix: bytes) -> bytes:
    # Empty prefix: the whole keyspace, which etcd spells key=range_end=b"\0".
    return bytes(aetcd.utils.prefix_range_end(prefix)) if prefix else b"\0"


def _key_text(raw: bytes) -> str:
    """etcd keys are bytes. One that is not UTF-8 (anyone with write access can make one) must reach the
    record decoders as a key they refuse, not as a UnicodeDecodeError that ends a watch; surrogateescape
    also maps it back to the same bytes, so such a key can still be deleted."""
    return raw.decode("utf-8", "surrogateescape")


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _key_start(prefix: bytes) -> bytes:
    return prefix or b"\0"


def _to_kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=_key_text(kv.key),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _to_event(event: Any) -> WatchEvent:
    kv = event.kv
    if event.type == _EVENT_DELETE:
        return WatchEvent(EventType.DELETE, _key_text(kv.key), b"", int(kv.mod_revision))
    return WatchEvent(
        EventType.PUT,
        _key_text(kv.key),
        bytes(kv.value),
        int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _cancelled_by_caller() -> bool:
    """Tell a real cancellation of our task from gRPC's: closing a channel (failover) makes every RPC
    still running on it raise asyncio.CancelledError in its caller, which is a connection loss."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _translate(exc: Any) -> Exception:
    """Map a grpc AioRpcError to our exception types by status code."""
    code = exc.code()
    if code == rpc.StatusCode.NOT_FOUND:
        # The only NOT_FOUND our requests can get: a lease that expired or was revoked.
        return LeaseLostError(f"etcd: {exc.details()}")
    if code == rpc.StatusCode.OUT_OF_RANGE:
        # "required revision has been compacted" on reads/compactions at an old revision.
        return CompactedError(f"etcd: {exc.details()}")
    if code in _TEMPORARY_CODES or code == _REAUTH_CODE:
        return StoreUnavailableError(f"etcd {code.name}: {exc.details()}")
    return EtcdRequestError(f"etcd {code.name}: {exc.details()}")


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
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        parsed = [_parse_endpoint(e) for e in endpoints]
        schemes = {scheme for scheme, _, _ in parsed}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints must all be http:// or all https://")
        self._scheme = schemes.pop()
        self._endpoints = [(host, port) for _, host, port in parsed]
        self._security = security or EtcdSecurity()
        if bool(self._security.user) != bool(self._security.password):
            raise ValueError("etcd auth needs both a user and a password")
        self._opening = asyncio.Lock()
        self._timeout = timeout
        self._watch_retry_delay = watch_retry_delay
        self._watch_max_retry_delay = watch_max_retry_delay
        self._index = 0
        self._generation = 0
        self._conn: _Conn | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

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
        host, port = self._endpoints[self._index]
        return f"{self._scheme}://{host}:{port}"

    # --- connection management ------------------------------------------------------------------

    async def _current(self) -> _Conn:
        if self._closed:
            raise RuntimeError("EtcdStore is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("EtcdStore used from a second event loop: create one store per loop")
        if self._conn is None:
            async with self._opening:  # one channel (and one Authenticate) even when many calls start at once
                if self._conn is None:
                    endpoint = self.endpoint
                    client = await self._open(*self._endpoints[self._index])
                    self._conn = _Conn(client, self._generation, endpoint)
        return self._conn

    async def _open(self, host: str, port: int) -> _Client:
        options = [
            ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
            # etcd's server policy forbids pings while no stream is open.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
        ]
        sec = self._security
        if self._scheme == "https":
            creds = grpc.ssl_channel_credentials(root_certificates=sec.ca, private_key=sec.key,
                                                 certificate_chain=sec.cert)
            channel = rpc.secure_channel(f"{host}:{port}", creds, options=options)
        else:
            channel = rpc.insecure_channel(f"{host}:{port}", options=options)
        metadata = None
        if sec.user:
            metadata = (("token", await self._authenticate(channel)),)
        # Building the channel and stubs does no network I/O; only Authenticate talks (under a deadline).
        return _Client(channel, metadata, rpc.KVStub(channel), rpc.LeaseStub(channel), rpc.MaintenanceStub(channel))

    async def _authenticate(self, channel: Any) -> str:
        request = rpc.AuthenticateRequest(name=self._security.user, password=self._security.password)
        where = self.endpoint
        try:
            call = rpc.AuthStub(channel).Authenticate(request, timeout=self._timeout)
            response = await asyncio.wait_for(call, self._timeout + _GUARD_MARGIN_S)
            return str(response.token)
        except TimeoutError as exc:
            await self._discard(channel, next_endpoint=True)
            raise StoreUnavailableError(f"etcd {where} did not authenticate in {self._timeout}s") from exc
        except rpc.AioRpcError as exc:
            await self._discard(channel, next_endpoint=exc.code() in _FAILOVER_CODES)
            raise _translate(exc) from exc
        except BaseException:
            await self._discard(channel, next_endpoint=False)
            raise

    async def _discard(self, channel: Any, *, next_endpoint: bool) -> None:
        """Drop a channel that never became the connection (its Authenticate failed)."""
        if next_endpoint:
            self._generation += 1
            self._index = (self._index + 1) % len(self._endpoints)
        await self._close_client(_Client(channel, None, None, None, None))

    async def _failover(self, conn: _Conn) -> None:
        """Drop `conn` and point at the next endpoint, unless another task already did."""
        if self._conn is not conn:
            return
        self._conn = None
        self._generation += 1
        self._index = (self._index + 1) % len(self._endpoints)
        log.warning("etcd endpoint %s failed; next calls go to %s", conn.endpoint, self.endpoint)
        await self._close_client(conn.client)

    async def _close_client(self, client: Any) -> None:
        try:
            # Closing cancels the channel's RPCs (watches on it fail over too); never let it hang.
            await asyncio.wait_for(client.close(), self._timeout)
        except Exception as exc:  # closing a broken channel may fail in many ways; it is gone anyway
            log.debug("closing etcd client failed: %r", exc)

    async def _call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run one RPC on the current connection, translating failures into our error types."""
        for attempt in (1, 2):
            conn = await self._current()
            try:
                return await asyncio.wait_for(op(conn.client), self._timeout + _GUARD_MARGIN_S)
            except TimeoutError as exc:
                await self._failover(conn)
                raise StoreUnavailableError(f"etcd {conn.endpoint} did not answer in {self._timeout}s") from exc
            except rpc.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES or exc.code() == _REAUTH_CODE:
                    await self._failover(conn)
                if exc.code() == _REAUTH_CODE and self._security.user and attempt == 1:
                    log.info("etcd auth token of %s expired; authenticating again", conn.endpoint)
                    continue
                raise _translate(exc) from exc
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
                raise StoreUnavailableError(f"etcd {conn.endpoint}: connection closed during the call") from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _kw(self, client: Any) -> dict[str, Any]:
        return {"timeout": self._timeout, "metadata": client.metadata}

    async def ping(self) -> None:
        """One round trip that needs no permission on any key (etcd's Status), so a user whose role covers
        only Nebula's prefix can still be checked at connect time."""

        async def op(c: Any) -> Any:
            return await c.maintenancestub.Status(rpc.StatusRequest(), **self._kw(c))

        await self._call(op)

    # --- KV -------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        async def op(c: Any) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(key=_key_bytes(key)), **self._kw(c))

        response = await self._call(op)
        return _to_kv(response.kvs[0]) if response.kvs else None

    async def list_prefix(self, prefix: str) -> Snapshot:
        raw = _key_bytes(prefix)
        request = rpc.RangeRequest(key=_key_start(raw), range_end=_range_end(raw))

        async def op(c: Any) -> Any:
            return await c.kvstub.Range(request, **self._kw(c))

        response = await self._call(op)
        # etcd returns a range sorted by key and all of it (limit 0) at header.revision.
        return Snapshot(items=tuple(_to_kv(kv) for kv in response.kvs), revision=int(response.header.revision))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=_key_bytes(key), value=value, lease=lease)

        async def op(c: Any) -> Any:
            return await c.kvstub.Put(request, **self._kw(c))

        return int((await self._call(op)).header.revision)

    async def delete(self, key: str) -> bool:
        return await self._delete_range(rpc.DeleteRangeRequest(key=_key_bytes(key))) > 0

    async def delete_prefix(self, prefix: str) -> int:
        raw = _key_bytes(prefix)
        return await self._delete_range(rpc.DeleteRangeRequest(key=_key_start(raw), range_end=_range_end(raw)))

    async def _delete_range(self, request: Any) -> int:
        async def op(c: Any) -> Any:
            return await c.kvstub.DeleteRange(request, **self._kw(c))

        return int((await self._call(op)).deleted)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        raw = _key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_VERSION, result=_TXN_EQUAL, version=0)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease))
        response = await self._txn(compare, put)
        return bool(response.succeeded)

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        raw = _key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=mod_revision)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease))
        response = await self._txn(compare, put)
        return bool(response.succeeded)

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        raw = _key_bytes(key)
        compare = rpc.Compare(key=raw, target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=mod_revision)
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw))
        response = await self._txn(compare, delete)
        # A missing key has mod_revision 0: the compare can succeed and still delete nothing.
        return bool(response.succeeded) and int(response.responses[0].response_delete_range.deleted) > 0

    async def commit(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        compares = [
            rpc.Compare(key=_key_bytes(g.key), target=_TXN_MOD, result=_TXN_EQUAL, mod_revision=g.mod_revision)
            if g.mod_revision is not None
            else rpc.Compare(key=_key_bytes(g.key), target=_TXN_LEASE, result=_TXN_EQUAL, lease=g.lease)
            for g in guards
        ]
        requests = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=_key_bytes(op.key), value=op.value, lease=op.lease))
            if isinstance(op, Put)
            else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_key_bytes(op.key)))
            for op in ops
        ]
        return bool((await self._txn(compares, *requests)).succeeded)

    async def _txn(self, compare: Any, *success: Any) -> Any:
        request = rpc.TxnRequest(compare=compare if isinstance(compare, list) else [compare], success=list(success),
                                 failure=[])

        async def op(c: Any) -> Any:
            return await c.kvstub.Txn(request, **self._kw(c))

        return await self._call(op)

    async def compact(self, revision: int) -> None:
        """Drop history below `revision` (ops/tests; services never compact)."""

        async def op(c: Any) -> Any:
            return await c.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True), **self._kw(c))

        await self._call(op)

    # --- watch ----------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        next_rev = start_revision
        failures = 0
        while True:
            try:
                conn = await self._current()
            except StoreUnavailableError as exc:  # authenticating a new channel failed: try again later
                log.warning("etcd watch on %r cannot connect (%s); resuming at %d", prefix, exc, next_rev)
                failures += 1
                await asyncio.sleep(backoff_delay(failures, base=self._watch_retry_delay,
                                                  cap=self._watch_max_retry_delay, jitter=random.random() * 0.2))
                continue
            try:
                async for batch in self._watch_stream(conn, prefix, next_rev):
                    failures = 0
                    for event in batch:
                        yield event
                    # Only after the whole revision went out: a resume never splits one.
                    next_rev = batch[-1].mod_revision + 1
                log.warning("etcd watch on %r ended by the server; resuming at %d", prefix, next_rev)
            except StoreUnavailableError as exc:
                log.warning("etcd watch on %r broke (%s); resuming at %d", prefix, exc, next_rev)
                await self._failover(conn)
            failures += 1
            await asyncio.sleep(
                backoff_delay(
                    failures,
                    base=self._watch_retry_delay,
                    cap=self._watch_max_retry_delay,
                    jitter=random.random() * 0.2,
                )
            )

    async def _watch_stream(self, conn: _Conn, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """One Watch RPC: yields each response's events; raises when the stream breaks."""
        raw = _key_bytes(prefix)
        create = rpc.WatchCreateRequest(key=_key_start(raw), range_end=_range_end(raw), start_revision=start_revision)
        # No deadline on the stream itself (it lives for ever); keepalive detects a dead peer.
        call = rpc.WatchStub(conn.client.channel).Watch(metadata=conn.client.metadata)
        try:
            responses = call.__aiter__()
            try:
                async with asyncio.timeout(self._timeout):
                    await call.write(rpc.WatchRequest(create_request=create))
                    created = await anext(responses, None)
            except TimeoutError as exc:
                raise StoreUnavailableError(f"etcd {conn.endpoint}: watch not created in {self._timeout}s") from exc
            self._check_watch_response(created, start_revision)
            async for response in responses:
                self._check_watch_response(response, start_revision)
                if response.events:
                    yield [_to_event(e) for e in response.events]
        except rpc.AioRpcError as exc:
            raise _translate(exc) from exc
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise StoreUnavailableError(f"etcd {conn.endpoint}: watch connection closed") from None
        finally:
            call.cancel()

    @staticmethod
    def _check_watch_response(response: Any, start_revision: int) -> None:
        if response is None:
            raise StoreUnavailableError("etcd closed the watch stream")
        if response.compact_revision:
            raise CompactedError(f"watch from revision {start_revision}: compacted up to {response.compact_revision}")
        if response.canceled:
            # Cancelled by the server for a reason other than compaction (e.g. leader lost).
            raise StoreUnavailableError(f"etcd cancelled the watch: {response.cancel_reason}")

    # --- leases ---------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), **self._kw(c))

        response = await self._call(op)
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

        response = await self._call(op)
        if response is None:
            raise StoreUnavailableError("etcd closed the keepalive stream")
        if int(response.TTL) <= 0:
            raise LeaseLostError(f"lease {lease:x} expired")
        return int(response.TTL)

    async def lease_ttl(self, lease: int) -> int:
        """Remaining TTL in seconds, -1 when the lease does not exist."""

        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease), **self._kw(c))

        return int((await self._call(op)).TTL)

    async def revoke_lease(self, lease: int) -> None:
        async def op(c: Any) -> Any:
            return await c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), **self._kw(c))

        with contextlib.suppress(LeaseLostError):  # already gone: revoking is idempotent
            await self._call(op)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close_client(conn.client)
