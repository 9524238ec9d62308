"""The admin API for API keys: create (the token is shown once), list (never a token), revoke.

Records live in etcd under /nebula/apikeys/<id> and hold the token's SHA-256 digest only. Like the
model admin API this reads and writes the store itself; every gateway's mirror picks changes up by watch,
and this gateway applies its own at once (a new key works, a revoked one stops, before the reply).
Keys from the config file are listed too (`"source": "config"`) but cannot be revoked here.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from aiohttp import web

from nebula.core import keys, records
from nebula.core.apikeys import SECRET_PREFIX, KeyRequest, digest, validate_key_id
from nebula.core.model import loads
from nebula.services.cluster.writes import Conflict, Refused
from nebula.services.gateway.records import decoded
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.errors import ApiError

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 3


def new_token() -> str:
    """256 random bits, URL-safe, with a prefix that makes a leaked token easy to recognise and grep for."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return secrets.token_hex(8)


async def create_key(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    wanted = KeyRequest.from_dict(loads(await request.read()))
    token = new_token()
    for _ in range(CREATE_ATTEMPTS):
        record = wanted.record(new_key_id(), digest(token), round(time.time(), 3))
        # Create-if-absent: a (vanishingly unlikely) id collision must not overwrite another key.
        try:
            stored = await st.writes.create_key(record, config_admin=st.auth.has_config_admin)
        except Refused as e:
            raise ApiError(409, str(e), param="scopes", code="admin_key_required") from None
        if stored:
            st.auth.created(record)
            log.info("API key %s (%s) created with scopes %s", record.id, record.name,
                     ",".join(sorted(s.value for s in record.scopes)))
            return web.json_response(record.public_dict() | {"key": token}, status=201)
    raise ApiError(409, "could not pick a free key id; retry", code="conflict")


async def list_keys(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    stored = decoded(records.APIKEYS, (await st.store.list_prefix(keys.APIKEYS)).items)
    data: list[dict[str, Any]] = [r.public_dict() | {"source": "etcd"}
                                  for r in sorted(stored, key=lambda r: (r.created, r.id))]
    data += [r.public_dict() | {"source": "config"} for r in st.auth.config_keys()]
    return web.json_response({"object": "list", "data": data})


async def revoke_key(request: web.Request) -> web.Response:
    st = request.app[GATEWAY]
    key_id = validate_key_id(request.match_info["id"])
    try:
        deleted = await st.writes.revoke_key(key_id, config_admin=st.auth.has_config_admin)
    except Refused as e:
        raise ApiError(409, str(e), param="id", code="last_admin_key") from None
    except Conflict as e:
        raise ApiError(409, str(e), code="conflict") from None
    if not deleted:
        raise ApiError(404, f"no API key with id '{key_id}'", param="id", code="key_not_found")
    st.auth.revoked(key_id)
    log.info("API key %s revoked", key_id)
    return web.json_response({"id": key_id, "deleted": True})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/admin/keys", create_key),
        web.get("/v1/admin/keys", list_keys),
        web.delete("/v1/admin/keys/{id}", revoke_key),
    ]
