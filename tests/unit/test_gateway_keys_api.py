"""API keys at the gateway over loopback: the keys admin API, keys stored in the (in-memory) store and
mirrored, the scopes of configured keys, and a caller without a key refused from the head (allowed models and
per-key limits: test_gateway_keys_limits.py; the bootstrap digest file and TLS: test_gateway_keys_tls.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.apikeys import KeyScope
from nebula.core.config import GatewayConfig
from nebula.core.model import loads
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.auth import Authenticator
from tests.harness.gateway_server import GatewayServer
from tests.unit.gateway_keys_fixtures import (
    ADMIN,
    CHAT,
    Clock,
    MakeGw,
    assert_error,
    engine_fixture,  # noqa: F401 (the fixture engine, which make_gw takes)
    make_gw_fixture,  # noqa: F401 (the fixture make_gw)
    put_key,
    sha,
    until_status,
)

# --- the keys admin API -----------------------------------------------------------------------------------

async def test_create_shows_the_token_once_and_stores_only_its_digest(make_gw: MakeGw) -> None:
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    key = await gw.create_key(name="ci", models=["m"], limits={"requests_per_minute": 100})
    token = key["key"]
    assert token.startswith("nbk_") and len(token) >= 4 + 43  # 256 random bits, URL-safe base64
    assert key["scopes"] == ["inference"] and key["models"] == ["m"] and "digest" not in key
    kv = await gw.store.get(keys.apikey_key(key["id"]))
    assert kv is not None and token.encode() not in kv.value
    assert loads(kv.value)["digest"] == sha(token)  # type: ignore[index]
    status, _, listed = await gw.call("GET", "/v1/admin/keys", ADMIN)
    assert status == 200 and token not in json.dumps(listed)
    stored = [k for k in listed["data"] if k["source"] == "etcd"]
    assert [k["id"] for k in stored] == [key["id"]] and all("key" not in k and "digest" not in k for k in stored)
    assert [k["source"] for k in listed["data"]].count("config") == 1
    # It works at once, for inference only.
    assert (await gw.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200
    status, _, body = await gw.call("GET", "/v1/admin/keys", token)
    assert status == 403
    assert_error(body, "insufficient_scope")


async def test_revoke_stops_the_key_at_once_and_twice_is_404(make_gw: MakeGw) -> None:
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    key = await gw.create_key(name="temp")
    assert (await gw.call("GET", "/v1/models", key["key"]))[0] == 200
    status, _, body = await gw.call("DELETE", f"/v1/admin/keys/{key['id']}", ADMIN)
    assert status == 200 and body == {"id": key["id"], "deleted": True}
    status, headers, body = await gw.call("GET", "/v1/models", key["key"])
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert_error(body, "invalid_api_key")
    status, _, body = await gw.call("DELETE", f"/v1/admin/keys/{key['id']}", ADMIN)
    assert status == 404
    assert_error(body, "key_not_found")
    status, _, body = await gw.call("DELETE", "/v1/admin/keys/not-an-id", ADMIN)
    assert status == 400 and body["error"]["param"] == "id"


@pytest.mark.parametrize(("body", "param"), [({"scopes": ["inference"]}, "name"), ({"name": "k", "scopes": ["root"]},
                                                                                     "scopes")])
async def test_create_rejects_bad_requests_naming_the_field(make_gw: MakeGw, body: dict[str, Any], param: str) -> None:
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    status, _, err = await gw.call("POST", "/v1/admin/keys", ADMIN, body)
    assert status == 400 and err["error"]["param"] == param
    assert (await gw.store.list_prefix(keys.APIKEYS)).items == ()


# --- keys from the store ----------------------------------------------------------------------------------

async def test_keys_written_by_another_gateway_are_mirrored(make_gw: MakeGw) -> None:
    gw = await make_gw()
    assert (await gw.call("GET", "/v1/admin/models"))[0] == 200  # no key anywhere: open
    await put_key(gw.store, "00000000000000aa", "t-admin", scopes=["admin"])
    await until_status(gw, "GET", "/v1/admin/models", None, 401)
    # Only /healthz and /metrics stay open.
    assert (await gw.call("GET", "/healthz"))[0] == 200 and (await gw.call("GET", "/metrics"))[0] == 200
    assert (await gw.call("GET", "/openapi.json"))[0] == 401
    assert (await gw.call("GET", "/openapi.json", "t-admin"))[0] == 200
    assert (await gw.call("GET", "/v1/admin/models", "t-admin"))[0] == 200
    # An admin-only key does not open inference.
    status, _, body = await gw.call("POST", "/v1/chat/completions", "t-admin", CHAT)
    assert status == 403
    assert_error(body, "insufficient_scope")
    # A damaged record opens nothing (it is ignored with a warning, but keeps the gateway closed).
    await gw.store.put(keys.apikey_key("00000000000000bb"), b"{not json")
    await gw.store.delete(keys.apikey_key("00000000000000aa"))
    await until_status(gw, "GET", "/v1/admin/models", "t-admin", 401)
    await gw.store.delete(keys.apikey_key("00000000000000bb"))
    await until_status(gw, "GET", "/v1/admin/models", None, 200)  # no key anywhere: open again


async def test_unknown_stored_keys_fail_closed_while_the_store_is_unreachable() -> None:
    store = MemoryStore()
    store.set_reachable(False)
    server = GatewayServer(build_gateway_app(GatewayConfig(), store, CollectorRegistry()))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/v1/models")) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert_error(await resp.json(), "keys_not_loaded")
    finally:
        await server.close()


def test_scopes_of_config_keys() -> None:
    auth = Authenticator([sha("adm")], [sha("usr")], Clock())
    by_name = {r.name: r.scopes for r in auth.config_keys()}
    assert by_name == {"config admin key": {KeyScope.ADMIN, KeyScope.INFERENCE},
                       "config api key": {KeyScope.INFERENCE}}


async def test_a_caller_without_a_key_is_refused_before_its_body_is_read(make_gw: MakeGw) -> None:
    # The data-plane server checks the key from the head: an unauthenticated client cannot make the gateway
    # hold a body (up to max_body_bytes per connection), and it learns so without sending one.
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: no-key-1\r\nContent-Length: 4000000\r\n\r\n" + b"{" * 1000)
        answer = await asyncio.wait_for(reader.read(), 5.0)  # the gateway closes after answering
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 401 Unauthorized"
    assert {"Connection: close", "X-Request-ID: no-key-1", "WWW-Authenticate: Bearer"} <= set(lines)
    assert_error(json.loads(body), "invalid_api_key")
    assert not [m for m in gw.engine.received if m.headers.get("X-Request-ID") == "no-key-1"]
