"""Translating between Nebula's store types and etcd's wire form (byte keys, protobuf records, gRPC status codes)."""

from __future__ import annotations

from typing import Any

import aetcd
from aetcd import rpc

from nebula.core.store import CompactedError, EventType, KeyValue, LeaseLostError, StoreUnavailableError, WatchEvent
from nebula.errors import PermanentError

# grpc ships no type stubs; aetcd.rpc re-exports what we need from it (typed Any, kept in the etcd modules).
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
# etcd's "invalid auth token": the channel's token expired (etcd restarted, or the token's TTL ran out).
REAUTH_CODE = rpc.StatusCode.UNAUTHENTICATED

_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE


class EtcdRequestError(PermanentError):
    """etcd rejected the request itself (invalid argument, permission...): retrying cannot help."""


def range_end(prefix: bytes) -> bytes:
    # Empty prefix: the whole keyspace, which etcd spells key=range_end=b"\0".
    return bytes(aetcd.utils.prefix_range_end(prefix)) if prefix else b"\0"


def key_text(raw: bytes) -> str:
    """etcd keys are bytes. One that is not UTF-8 (anyone with write access can make one) must reach the
    record decoders as a key they refuse, not as a UnicodeDecodeError that ends a watch; surrogateescape
    also maps it back to the same bytes, so such a key can still be deleted."""
    return raw.decode("utf-8", "surrogateescape")


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def key_start(prefix: bytes) -> bytes:
    return prefix or b"\0"


def to_kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=key_text(kv.key),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def to_event(event: Any) -> WatchEvent:
    kv = event.kv
    if event.type == _EVENT_DELETE:
        return WatchEvent(EventType.DELETE, key_text(kv.key), b"", int(kv.mod_revision))
    return WatchEvent(
        EventType.PUT,
        key_text(kv.key),
        bytes(kv.value),
        int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def translate(exc: Any) -> Exception:
    """Map a grpc AioRpcError to our exception types by status code."""
    code = exc.code()
    if code == rpc.StatusCode.NOT_FOUND:
        # The only NOT_FOUND our requests can get: a lease that expired or was revoked.
        return LeaseLostError(f"etcd: {exc.details()}")
    if code == rpc.StatusCode.OUT_OF_RANGE:
        # "required revision has been compacted" on reads/compactions at an old revision.
        return CompactedError(f"etcd: {exc.details()}")
    if code in _TEMPORARY_CODES or code == REAUTH_CODE:
        return StoreUnavailableError(f"etcd {code.name}: {exc.details()}")
    return EtcdRequestError(f"etcd {code.name}: {exc.details()}")
