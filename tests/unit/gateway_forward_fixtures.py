"""The gateway over loopback in front of real aiohttp fake engines, shared by the forwarding tests
(test_gateway_relay.py, test_gateway_retries.py, test_gateway_picks.py): request bodies, the `Gateway` a test
drives, and the fixtures `make_gateway` and `two`. A test module imports the fixtures its tests take by their
function names, `make_gateway_fixture,  # noqa: F401` (the name= keeps a test's argument from shadowing the
import)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, until


def chat(user: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": user}]}).encode()


# No text to key prefix affinity on: picks go by load and turns alone, which most tests here rely on.
CHAT = chat("")
CHAT_STREAM = json.dumps({"model": "m", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()


async def put_model(store: MemoryStore, name: str = "m") -> None:
    spec = ModelSpec(name=name, source=f"org/{name}")
    await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))


@dataclass
class Gateway:
    store: MemoryStore
    registry: CollectorRegistry
    server: GatewayServer
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def post(self, body: bytes, path: str = "/v1/chat/completions",
             headers: dict[str, str] | None = None) -> aiohttp.client._RequestContextManager:
        sent = {"Content-Type": "application/json", **(headers or {})}
        return self.http.post(self.url(path), data=body, headers=sent)

    @property
    def table(self) -> ReplicaTable:
        return self.server.app[GATEWAY].table

    def ready_count(self, model: str = "m") -> int:
        return len(self.table.ready().get(model, ()))

    def polled(self, endpoint: str) -> bool:
        return self.table.loads.sample(endpoint) is not None

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture(name="make_gateway")
async def make_gateway_fixture() -> AsyncIterator[MakeGateway]:
    made: list[Gateway] = []

    async def make(**cfg: Any) -> Gateway:
        store, registry = MemoryStore(), CollectorRegistry()
        await put_model(store)
        app = build_gateway_app(GatewayConfig(**{"connect_timeout_s": 1.0, **cfg}), store, registry)
        server = GatewayServer(app)
        await server.start_server()
        r = Gateway(store, registry, server, aiohttp.ClientSession(auto_decompress=False))
        made.append(r)
        await until(lambda: "m" in server.app[GATEWAY].view.models)
        return r

    yield make
    for r in made:
        await r.http.close()
        await r.server.close()


@pytest.fixture(name="two")
async def two_fixture() -> AsyncIterator[list[FakeEngine]]:
    async for started in engines("a", "b"):
        yield started


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
