"""The gateway's client connections over loopback: a key's concurrency slot is taken from the request's head
(so a body still on its way counts) and comes back however the request ends; the connection caps keep
/healthz answering and show in the gateway's metrics. The caps and deadlines themselves:
test_fastserver_limits.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.http.fastserver import FastServer
from tests.harness.fastserver import Conn, read_answer
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, put_instance, until

pytestmark = pytest.mark.timeout(60)

TOKEN, KEY_ID = "limited-token", "00000000000000ee"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Gateway:
    def __init__(self, server: GatewayServer, engine: FakeEngine) -> None:
        self.server = server
        self.engine = engine

    @property
    def state(self) -> GatewayState:
        return self.server.app[GATEWAY]

    @property
    def fast(self) -> FastServer:
        assert self.server.site is not None
        return self.server.site.server

    async def connect(self, source: str = "") -> Conn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port, local_addr=(source, 0) if source else None)
        return Conn(reader, writer)

    async def post(self, path: str, body: bytes, source: str = "") -> tuple[int, dict[str, Any]]:
        conn = await self.connect(source)
        await conn.send(f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = await conn.answer()
        conn.writer.close()
        return answer.status, json.loads(answer.body)

    async def get(self, path: str) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as http, http.get(self.server.make_url(path)) as resp:
            return resp.status, await resp.read()

    def inflight(self) -> int:
        return self.state.auth.limiter.inflight(KEY_ID)


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for (started,) in engines("a"):
        yield started


@pytest.fixture
async def make_gateway(engine: FakeEngine) -> AsyncIterator[MakeGateway]:
    made: list[GatewayServer] = []

    async def make(**cfg: Any) -> Gateway:
        store = MemoryStore()
        await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/x").to_dict()))
        await put_instance(store, "m", engine.endpoint)
        record = KeyRequest.from_dict({"name": "limited", "limits": {"max_concurrent": 1}}).record(
            KEY_ID, digest(TOKEN), 1.0)
        await store.put(keys.apikey_key(KEY_ID), dumps(record.to_dict()))
        server = GatewayServer(build_gateway_app(GatewayConfig(**{"load_poll_s": 0, **cfg}), store,
                                                 CollectorRegistry()))
        await server.start_server()
        made.append(server)
        gw = Gateway(server, engine)
        await until(lambda: gw.state.auth.synced and len(gw.state.table.ready()) == 1)
        return gw

    yield make
    for server in made:
        await server.close()


async def slow_upload(gw: Gateway) -> Conn:
    """A chat request whose head and part of its body came, the rest of it not (yet)."""
    conn = await gw.connect()
    await conn.send(f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT[:10])
    await until(lambda: gw.inflight() == 1)
    return conn


async def test_a_body_on_its_way_holds_the_keys_slot_until_a_cut(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(body_timeout_s=30)
    uploading = await slow_upload(gw)
    # The key's one slot is the upload's: a second request is refused from its head.
    status, body = await gw.post("/v1/chat/completions", CHAT)
    assert (status, body["error"]["code"]) == (429, "concurrency_limit_exceeded")
    # The upload misses its body deadline: cut with 408, and the slot comes back.
    gw.fast.sweep(time.monotonic() + 31)
    answer = await read_answer(uploading.reader)
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (408, "request_timeout")
    assert gw.inflight() == 0
    assert (await gw.post("/v1/chat/completions", CHAT))[0] == 200
    assert gw.inflight() == 0


async def test_a_client_that_leaves_mid_body_gives_the_slot_back(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    uploading = await slow_upload(gw)
    uploading.writer.close()
    await until(lambda: gw.inflight() == 0)
    assert (await gw.post("/v1/chat/completions", CHAT))[0] == 200


async def test_a_request_cut_at_its_deadline_gives_the_slot_back(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(request_timeout_s=100)
    gw.engine.hold = asyncio.Event()
    answering = asyncio.create_task(gw.post("/v1/chat/completions", CHAT))
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    assert gw.inflight() == 1
    gw.fast.sweep(time.monotonic() + 101)
    status, body = await answering
    assert (status, body["error"]["code"]) == (504, "request_timeout")
    await asyncio.wait_for(gw.engine.cancelled.wait(), 5)  # the engine request was closed too
    assert gw.inflight() == 0


async def test_healthz_answers_over_the_cap_and_the_metrics_count_refusals(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(max_connections=1, max_connections_per_ip=3)
    gw.engine.hold = asyncio.Event()
    answering = asyncio.create_task(gw.post("/v1/chat/completions", CHAT))  # the one connection, busy
    await asyncio.wait_for(gw.engine.held.wait(), 5)
    # Over the cap, with nothing idle to close: the operator's paths are still served...
    assert (await gw.get("/healthz"))[0] == 200
    # ... and a request for anything else is told why.
    status, body = await gw.post("/v1/chat/completions", CHAT)
    assert (status, body["error"]["code"]) == (503, "too_many_connections")
    # One client may not hold more than its own cap, even of the reserve.
    held = [await gw.connect(source="127.0.0.2") for _ in range(3)]
    extra = await gw.connect(source="127.0.0.2")
    assert await extra.reader.read() == b""
    status, metrics = await gw.get("/metrics")
    text = metrics.decode()
    assert 'nebula_gateway_connections_refused_total{reason="per_ip"} 1.0' in text
    assert 'nebula_gateway_connections_refused_total{reason="reserve_path"} 1.0' in text
    assert "nebula_gateway_open_connections " in text
    for conn in held:
        conn.writer.close()
    gw.engine.hold.set()
    assert (await answering)[0] == 200
