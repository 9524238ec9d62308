"""The gateway over loopback in front of one fake engine, serving a generate, an embed and a rerank model: the
`Stack` the API tests drive (test_gateway_validation.py, test_gateway_inference.py, test_gateway_admin.py), the
fixtures `make_stack` and `engine`, and the check of the OpenAI error shape. A test module imports the fixtures
its tests take by their function names, `make_stack_fixture,  # noqa: F401` (the name= keeps a test's argument
from shadowing the import)."""

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
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, Phase, Task, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, put_instance, until

ADMIN_KEY, USER_KEY = "admin-secret", "user-secret"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MODELS = [ModelSpec(name="m", source="org/m"), ModelSpec(name="e", source="org/e", task=Task.EMBED),
          ModelSpec(name="r", source="org/r", task=Task.RERANK)]


@dataclass
class Stack:
    store: MemoryStore
    registry: CollectorRegistry
    gateway: GatewayServer
    http: aiohttp.ClientSession
    engine: FakeEngine

    def url(self, path: str) -> str:
        return str(self.gateway.make_url(path))

    async def call(self, method: str, path: str, body: object = None, key: str | None = None,
                   raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, self.url(path), data=data, headers=headers) as resp:
            text = await resp.read()
            return resp.status, dict(resp.headers), json.loads(text) if text else None


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture(name="engine")
async def engine_fixture() -> AsyncIterator[FakeEngine]:
    async for started in engines("a"):
        yield started[0]


@pytest.fixture(name="make_stack")
async def make_stack_fixture(engine: FakeEngine) -> AsyncIterator[MakeStack]:
    made: list[Stack] = []

    async def make(**cfg: Any) -> Stack:
        store = MemoryStore()
        for spec in MODELS:
            await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
        await put_instance(store, "m", engine.endpoint)
        await put_instance(store, "m:1", "http://127.0.0.1:1", Phase.STARTING)
        await put_instance(store, "e", engine.endpoint, model="e", task=Task.EMBED)
        registry = CollectorRegistry()
        gateway = GatewayServer(build_gateway_app(GatewayConfig(**cfg), store, registry))
        await gateway.start_server()
        stack = Stack(store, registry, gateway, aiohttp.ClientSession(), engine)
        made.append(stack)
        await until(lambda: len(gateway.app[GATEWAY].view.models) == len(MODELS)
                    and bool(gateway.app[GATEWAY].table.ready().get("m")))
        return stack

    yield make
    for s in made:
        await s.http.close()
        await s.gateway.close()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(body: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                           404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
                           413: "invalid_request_error", 503: "server_error"}[status]
    if code is not None:
        assert err["code"] == code
    return err
