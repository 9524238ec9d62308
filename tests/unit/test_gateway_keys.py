"""API keys at the gateway over loopback: the keys admin API, keys stored in the (in-memory) store and
mirrored, scopes, allowed models, per-key limits (429 + Retry-After), the bootstrap digest file, and HTTPS
with the real `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys, records
from nebula.core.apikeys import KeyRequest, KeyScope, digest
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.model import ModelSpec, dumps, loads
from nebula.errors import ConfigError
from nebula.services.gateway.app import build_gateway_app, serve_gateway
from nebula.services.gateway.auth import (
    Authenticator,
    check_model_allowed,
    model_allowed,
    read_digest_file,
    request_key,
)
from nebula.services.gateway.pipeline import RequestPipeline, pipeline_middleware
from nebula.services.gateway.state import GATEWAY
from nebula.services.gateway.tls import server_ssl_context
from nebula.services.http.errors import ApiError, error_middleware
from tests.harness.gateway_server import GatewayServer
from tests.harness.mirrors import mirrored
from tests.harness.ports import free_port
from tests.harness.tls import make_pki
from tests.unit.fake_engine import FakeEngine, engines, put_instance, until

ADMIN = "admin-token"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Gw:
    store: MemoryStore
    server: GatewayServer
    http: aiohttp.ClientSession
    engine: FakeEngine
    clock: Clock

    async def call(self, method: str, path: str, key: str | None = None, body: object = None
                   ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, self.server.make_url(path), json=body, headers=headers) as resp:
            raw = await resp.read()
            parsed = json.loads(raw) if raw and resp.content_type == "application/json" else None
            return resp.status, dict(resp.headers), parsed

    async def create_key(self, **body: Any) -> dict[str, Any]:
        status, _, key = await self.call("POST", "/v1/admin/keys", ADMIN, body)
        assert status == 201, key
        return dict(key)


MakeGw = Callable[..., Awaitable[Gw]]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for (started,) in engines("a"):
        yield started


@pytest.fixture
async def make_gw(engine: FakeEngine) -> AsyncIterator[MakeGw]:
    made: list[Gw] = []

    async def make(**cfg: Any) -> Gw:
        store = MemoryStore()
        for name in ("m", "other"):
            await store.put(keys.model_key(name), dumps(ModelSpec(name=name, source="/models/x").to_dict()))
            await put_instance(store, name, engine.endpoint, model=name)
        clock = Clock()
        app = build_gateway_app(GatewayConfig(**{"load_poll_s": 0, **cfg}), store, CollectorRegistry(), clock=clock)
        server = GatewayServer(app)
        await server.start_server()
        gw = Gw(store, server, aiohttp.ClientSession(), engine, clock)
        made.append(gw)
        st = app[GATEWAY]
        await until(lambda: st.auth.synced and len(st.table.ready()) == 2)
        return gw

    yield make
    for gw in made:
        await gw.http.close()
        await gw.server.close()


def assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body


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

async def put_key(store: MemoryStore, key_id: str, token: str, **req: Any) -> None:
    record = KeyRequest.from_dict({"name": key_id, **req}).record(key_id, digest(token), 1.0)
    await store.put(keys.apikey_key(key_id), dumps(record.to_dict()))


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


async def until_status(gw: Gw, method: str, path: str, key: str | None, want: int) -> None:
    async def reached() -> bool:
        return (await gw.call(method, path, key))[0] == want

    await until(reached)


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


# --- allowed models and the request's key ----------------------------------------------------------------

async def test_request_key_and_model_checks_for_the_handlers() -> None:
    auth = Authenticator((), (), Clock())
    auth.update_keys(mirrored(records.APIKEYS))
    record = KeyRequest.from_dict({"name": "k", "models": ["m"]}).record("0000000000000001", digest("tok"), 0)
    auth.created(record)

    async def handler(request: web.Request) -> web.Response:
        key = request_key(request)
        model = request.query["model"]
        check_model_allowed(key, model)
        return web.json_response({"key": key.id if key else None, "model": model})

    app = web.Application(middlewares=[error_middleware, pipeline_middleware(RequestPipeline(auth))])
    app.router.add_get("/v1/x", handler)
    server = TestServer(app)  # not a gateway app: aiohttp alone serves it
    await server.start_server()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as http:
            async with http.get(server.make_url("/v1/x?model=m")) as resp:
                assert resp.status == 200 and await resp.json() == {"key": record.id, "model": "m"}
            async with http.get(server.make_url("/v1/x?model=n")) as resp:
                assert resp.status == 403
                body = await resp.json()
                assert_error(body, "model_not_allowed")
                assert body["error"]["param"] == "model" and body["error"]["type"] == "permission_error"
    finally:
        await server.close()
    assert model_allowed(None, "anything") and model_allowed(record, "m") and not model_allowed(record, "n")
    with pytest.raises(ApiError):
        check_model_allowed(record, "n")


# --- per-key limits ---------------------------------------------------------------------------------------

async def test_a_key_limited_to_models_sees_and_uses_only_those(make_gw: MakeGw) -> None:
    gw = await make_gw(admin_key_hashes=(sha(ADMIN),))
    token = (await gw.create_key(name="only-m", models=["m"]))["key"]
    assert (await gw.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200
    other = {**CHAT, "model": "other"}
    status, _, body = await gw.call("POST", "/v1/chat/completions", token, other)
    assert status == 403
    assert_error(body, "model_not_allowed")
    # Refused before the lookup: an unknown model looks the same as a forbidden one.
    status, _, body = await gw.call("POST", "/v1/chat/completions", token, {**CHAT, "model": "nope"})
    assert status == 403
    status, _, listed = await gw.call("GET", "/v1/models", token)
    assert status == 200 and [m["id"] for m in listed["data"]] == ["m"]
    assert (await gw.call("GET", "/v1/models/other", token))[0] == 404
    assert (await gw.call("GET", "/v1/models/other", ADMIN))[0] == 200


async def test_requests_per_minute_429_with_retry_after(make_gw: MakeGw) -> None:
    gw = await make_gw()
    await put_key(gw.store, "00000000000000cc", "t", limits={"requests_per_minute": 2})
    await until_status(gw, "GET", "/v1/models", None, 401)
    gw.clock.now += 60  # the key's bucket starts full whenever it was first used
    assert (await gw.call("POST", "/v1/chat/completions", "t", CHAT))[0] == 200
    assert (await gw.call("GET", "/v1/models", "t"))[0] == 200
    status, headers, body = await gw.call("POST", "/v1/chat/completions", "t", CHAT)
    assert status == 429 and headers["Retry-After"] == "30"
    assert_error(body, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error"
    gw.clock.now += 30
    assert (await gw.call("POST", "/v1/chat/completions", "t", CHAT))[0] == 200
    # The real openai client sees a RateLimitError (no retries, so the test sees the first answer).
    client = openai.AsyncOpenAI(base_url=str(gw.server.make_url("/v1")), api_key="t", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()


async def test_concurrency_slot_is_held_for_the_response_and_freed_on_disconnect(make_gw: MakeGw) -> None:
    gw = await make_gw()
    await put_key(gw.store, "00000000000000dd", "t", limits={"max_concurrent": 1})
    await until_status(gw, "GET", "/v1/models", None, 401)
    auth = gw.server.app[GATEWAY].auth
    gw.engine.hold = asyncio.Event()
    first = asyncio.create_task(gw.call("POST", "/v1/chat/completions", "t", CHAT))
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    status, headers, body = await gw.call("POST", "/v1/chat/completions", "t", CHAT)
    assert status == 429 and headers["Retry-After"] == "1"
    assert_error(body, "concurrency_limit_exceeded")
    gw.engine.hold.set()
    assert (await first)[0] == 200
    assert auth.limiter.inflight("00000000000000dd") == 0
    # A streamed answer holds the slot until its last byte; a client that goes away frees it.
    gw.engine.hold = asyncio.Event()
    gw.engine.held.clear()
    gone = asyncio.create_task(gw.call("POST", "/v1/chat/completions", "t", {**CHAT, "stream": True}))
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    assert auth.limiter.inflight("00000000000000dd") == 1
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(gw.engine.cancelled.wait(), 5)
    await until(lambda: auth.limiter.inflight("00000000000000dd") == 0)
    gw.engine.hold = None
    assert (await gw.call("POST", "/v1/chat/completions", "t", {**CHAT, "stream": True}))[0] == 200


# --- the bootstrap key file, TLS -------------------------------------------------------------------------

def test_digest_file_formats_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "admin.key.sha256"
    assert read_digest_file(str(tmp_path / "absent")) == () and read_digest_file("") == ()
    f.write_text(f"{sha('a')}  -\n# rotated:\n{sha('b').upper()}\n\n")
    assert read_digest_file(str(f)) == (sha("a"), sha("b"))
    f.write_text("nbk_oops-this-is-the-token-itself\n")
    with pytest.raises(ConfigError, match=r"^gateway.admin_key_digest_file: .*:1: not a SHA-256 hex digest"):
        read_digest_file(str(f))


@contextlib.asynccontextmanager
async def serving(cfg: NebulaConfig, store: MemoryStore) -> AsyncIterator[None]:
    notifier = Notifier({})
    task = asyncio.create_task(serve_gateway(cfg, store, CollectorRegistry(), notifier))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_gateway_over_tls_with_the_bootstrap_key_and_the_openai_client(tmp_path: Path, engine: FakeEngine
                                                                              ) -> None:
    pki = make_pki(tmp_path / "pki")
    digest_file = tmp_path / "admin.key.sha256"
    digest_file.write_text(sha(ADMIN) + "  -\n")
    port = free_port()
    cfg = NebulaConfig(gateway=GatewayConfig(port=port, tls_cert_file=str(pki.server_cert),
                                             tls_key_file=str(pki.server_key), admin_key_digest_file=str(digest_file),
                                             load_poll_s=0))
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/x").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    ctx = pki.client_context()
    url = f"https://127.0.0.1:{port}"
    async with serving(cfg, store), aiohttp.ClientSession() as http:

        async def up() -> bool:
            try:
                async with http.get(f"{url}/healthz", ssl=ctx) as resp:
                    return bool((await resp.json())["ready_replicas"] == 1)
            except aiohttp.ClientConnectionError:
                return False

        await until(up)
        async with http.get(f"{url}/v1/admin/models", ssl=ctx) as resp:
            assert resp.status == 401  # the bootstrap key's digest closed the gateway
        async with http.get(f"{url}/v1/admin/models", ssl=ctx, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):  # plain HTTP on the TLS port
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                await resp.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # nobody trusts a self-signed CA
            async with http.get(f"{url}/healthz") as resp:
                await resp.read()
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0,
                                    http_client=openai.DefaultAsyncHttpxClient(verify=ctx))
        reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello from a"
        stream = await client.chat.completions.create(model="m", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "hello from a"
        await client.close()


def test_bad_certificate_files_stop_the_start_naming_the_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^gateway\.tls_cert_file: .*not a PEM"):
        server_ssl_context(GatewayConfig(tls_cert_file=str(junk), tls_key_file=str(junk)))
    with pytest.raises(ConfigError, match=r"^gateway\.tls_cert_file: cannot read"):
        server_ssl_context(GatewayConfig(tls_cert_file=str(tmp_path / "nope"), tls_key_file=str(junk)))
    assert server_ssl_context(GatewayConfig()) is None


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
