"""The gateway over loopback with a clock the tests move, in front of one fake engine serving two models: the
`Gw` the API key tests drive (test_gateway_keys_api.py, test_gateway_keys_limits.py, test_gateway_keys_tls.py),
the fixtures `make_gw` and `engine`, and helpers to store a key and to wait for an answer. A test module imports
the fixtures its tests take by their function names, `make_gw_fixture,  # noqa: F401` (the name= keeps a test's
argument from shadowing the import)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.apikeys import KeyRequest, digest
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
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


@pytest.fixture(name="engine")
async def engine_fixture() -> AsyncIterator[FakeEngine]:
    async for (started,) in engines("a"):
        yield started


@pytest.fixture(name="make_gw")
async def make_gw_fixture(engine: FakeEngine) -> AsyncIterator[MakeGw]:
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


async def put_key(store: MemoryStore, key_id: str, token: str, **req: Any) -> None:
    record = KeyRequest.from_dict({"name": key_id, **req}).record(key_id, digest(token), 1.0)
    await store.put(keys.apikey_key(key_id), dumps(record.to_dict()))


async def until_status(gw: Gw, method: str, path: str, key: str | None, want: int) -> None:
    async def reached() -> bool:
        return (await gw.call(method, path, key))[0] == want

    await until(reached)
