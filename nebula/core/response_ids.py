"""Responses API ids that name the replica holding the response. Pure functions, no I/O.

vLLM keeps a stored response (and the messages a `previous_response_id` follow-up continues) in the memory
of the one engine that made it, under the id the request's `request_id` field gave it. So the gateway
chooses that id: `resp_<token>_<random>`, where the token names the replica *incarnation* the request was
sent to (its instance, node, endpoint and restart count). Every later request naming the id (GET, cancel,
`previous_response_id`) is routed by decoding the token, with no table shared between gateway workers or
gateways: each computes the same tokens from the same instance records in etcd.

An engine that restarted lost its store: its restart count changed, so its token no longer matches and the
gateway says the response is gone instead of asking an engine that never held it. Where the count misses a
restart (an engine stopped and started again as a new placement on the same port), the engine itself answers
404 for the id: the random part makes it impossible for any other engine to hold a response by that name,
so a follow-up can never be answered from the wrong conversation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

PREFIX = "resp_"
TOKEN_HEX = 16  # 64 bits: no two replicas of one cluster share a token
RANDOM_HEX = 32  # as many random bits as vLLM's own resp_<uuid4 hex>
_ID = re.compile(rf"resp_([0-9a-f]{{{TOKEN_HEX}}})_[0-9a-f]{{{RANDOM_HEX}}}")
_JSON_SPACE = b" \t\r\n"
FIELD = "request_id"  # the vLLM extra field whose value becomes the response's id


def replica_token(instance: str, node: str, endpoint: str, restarts: int) -> str:
    """The token of one incarnation of a replica (TOKEN_HEX lowercase hex chars), stable across processes."""
    h = hashlib.blake2b(digest_size=TOKEN_HEX // 2)
    for part in (instance, node, endpoint, str(restarts)):
        data = part.encode("utf-8", "replace")
        h.update(len(data).to_bytes(8, "big"))  # length-prefixed: no field can forge another's boundary
        h.update(data)
    return h.hexdigest()


def response_id(token: str, random_hex: str) -> str:
    """The id of a response made by the replica of `token`; `random_hex`: RANDOM_HEX random hex chars."""
    rid = f"{PREFIX}{token}_{random_hex}"
    if not _ID.fullmatch(rid):
        raise ValueError(f"not a replica token and {RANDOM_HEX} random hex chars: {token!r}, {random_hex!r}")
    return rid


def token_of(rid: object) -> str | None:
    """The replica token in a response id the gateway issued; None for anything else (URL-safe by shape)."""
    if not isinstance(rid, str):
        return None
    m = _ID.fullmatch(rid)
    return m.group(1) if m else None


def with_request_id(raw: bytes, body: Mapping[str, Any], rid: str) -> bytes:
    """The request body `raw` (which parsed to the object `body`) with its `request_id` set to `rid`.

    The common case splices `,"request_id":"<rid>"` before the object's closing brace, so every field the
    client sent reaches the engine byte for byte. A body that already has a request_id (the gateway's id
    wins: routing the follow-ups depends on it), an empty object, or one that is not plain UTF-8 (a BOM,
    UTF-16/32) is encoded again from `body` instead, with the same values.
    """
    if token_of(rid) is None:
        raise ValueError(f"not a response id: {rid!r}")
    if body and FIELD not in body:
        end = len(raw.rstrip(_JSON_SPACE))
        start = len(raw) - len(raw.lstrip(_JSON_SPACE))
        if end > start and raw[start:start + 1] == b"{" and raw[end - 1:end] == b"}":
            return b"%s,\"%s\":\"%s\"%s" % (raw[:end - 1], FIELD.encode(), rid.encode(), raw[end - 1:])
    return json.dumps({**body, FIELD: rid}, separators=(",", ":")).encode()
