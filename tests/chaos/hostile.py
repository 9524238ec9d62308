"""The hostile-records fault's garbage: what anyone with write access to etcd could leave under each prefix.

Written and read back through etcd's own JSON gateway (raw bytes, so keys that are not UTF-8 too): nothing
here goes through Nebula's code, which is what is under test.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from nebula.core import keys
from tests.harness.etcd import etcd_call

SPEC = {"name": "x", "source": "/models/x"}
PLACEMENT = {"instance": "x", "node": "node-a", "model": SPEC, "port": 18999, "gpu_indices": []}
INSTANCE = {"instance": "x", "model": "x", "node": "node-a", "phase": "ready", "endpoint": "http://127.0.0.1:1"}
KEY = {"id": "0123456789abcdef", "name": "x", "digest": "a" * 64, "scopes": ["inference"]}

HUGE = 10**400
"""An integer no float holds: `"created": 1e400` written out."""


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def garbage() -> list[tuple[bytes, bytes]]:
    """(key, value) pairs: wrong types, huge numbers, invalid UTF-8 in keys and values, deep JSON, path-like
    names and records stored under another record's key, under every prefix the services mirror or read."""
    deep = b"[" * 60_000 + b"]" * 60_000
    not_utf8 = b"\xff\xfe"
    return [
        ((keys.APIKEYS + "huge").encode(), _json(KEY | {"id": "0000000000000001", "created": HUGE})),
        ((keys.APIKEYS + "types").encode(), _json(KEY | {"scopes": "admin", "limits": [1]})),
        (keys.APIKEYS.encode() + not_utf8, _json(KEY)),
        ((keys.MODELS + "deep").encode(), deep),
        ((keys.MODELS + "../../tmp/x").encode(), _json(SPEC)),
        ((keys.MODELS + "types").encode(), _json(SPEC | {"name": "types", "replicas": "2", "labels": [1]})),
        ((keys.NODES + "bad-gpu").encode(), _json({"name": "bad-gpu", "address": "127.0.0.1", "port_min": 1,
                                                   "port_max": 2, "gpus": [{"index": "zero"}]})),
        ((keys.NODES + "huge").encode(), _json({"name": "huge", "address": "x", "port_min": HUGE, "port_max": 1})),
        ((keys.PLACEMENTS + "node-a/../../tmp/x").encode(), _json(PLACEMENT | {"instance": "../../tmp/x"})),
        ((keys.PLACEMENTS + "node-a/types").encode(), _json(PLACEMENT | {"instance": "types",
                                                                         "gpu_indices": ["a", None]})),
        (keys.PLACEMENTS.encode() + b"node-a/" + not_utf8, not_utf8),
        ((keys.INSTANCES + "huge").encode(), _json(INSTANCE | {"instance": "huge", "since": HUGE})),
        ((keys.INSTANCES + "deep").encode(), deep),
        (keys.INSTANCES.encode() + not_utf8, b"\x00" + not_utf8),
        ((keys.PULLS + "node-a/0123456789abcdef").encode(), _json({"id": 7, "node": ["node-a"]})),
        ((keys.SERVICES + "x").encode(), b"1e400"),
        ((keys.MODEL_STATUS + "x").encode(), _json({"model": None})),
    ]


def named(key: bytes) -> str:
    """The key as the services' logs name it (Python's repr of the surrogate-escaped text)."""
    return repr(key.decode("utf-8", "surrogateescape"))


def put_raw(endpoints: Sequence[str], key: bytes, value: bytes, lease: int = 0) -> None:
    body: dict[str, Any] = {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}
    if lease:
        body["lease"] = str(lease)
    etcd_call(endpoints[0], "/v3/kv/put", body, timeout=5.0)


def delete_raw(endpoints: Sequence[str], key: bytes) -> None:
    etcd_call(endpoints[0], "/v3/kv/deleterange", {"key": base64.b64encode(key).decode()}, timeout=5.0)


def mirrored_by(key: bytes) -> tuple[str, ...]:
    """The services whose mirrors follow `key`'s prefix (each names a bad record once per revision)."""
    text = key.decode("utf-8", "surrogateescape")
    if text.startswith((keys.APIKEYS, keys.INSTANCES)):
        return ("gateway",)
    if text.startswith(keys.MODELS):
        return ("gateway", "scheduler", "scheduler-2")
    if text.startswith(keys.NODES):
        return ("scheduler", "scheduler-2")
    if text.startswith(keys.PLACEMENTS + "node-a/"):
        return ("scheduler", "scheduler-2", "node")
    if text.startswith(keys.PULLS + "node-a/"):
        return ("node",)
    return ()
