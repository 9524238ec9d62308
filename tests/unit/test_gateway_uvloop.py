"""The gateway's data path on uvloop (gateway.event_loop = "uvloop"): its transports are not asyncio's
classes, and its server objects differ, so the data-plane server, the hand-over to aiohttp and the engine
client are run once on it end to end."""

from __future__ import annotations

import json

import aiohttp
import uvloop
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, put_instance, until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _scenario() -> None:
    engine = FakeEngine("a")
    await engine.start()
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="org/m").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    app = build_gateway_app(GatewayConfig(load_poll_s=0, max_body_bytes=4096), store, CollectorRegistry())
    server = GatewayServer(app)  # port 0: the bound port is read from uvloop's server
    await server.start_server()
    try:
        await until(lambda: len(app[GATEWAY].table.ready().get("m", ())) == 1)
        url = str(server.make_url("/v1/chat/completions"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            async with http.post(url, json=CHAT) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == "hello from a"
            async with http.post(url, json={**CHAT, "stream": True}) as resp:
                assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
                assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
            async with http.post(url, json={**CHAT, "pad": "x" * 8192}) as resp:
                assert resp.status == 413  # refused by the data-plane server, which then closes
            async with http.get(server.make_url("/healthz")) as resp:
                assert resp.status == 200  # hands the (new) connection to aiohttp
            async with http.post(url, data=json.dumps(CHAT)) as resp:
                assert resp.status == 200  # through aiohttp's OpenAI route, same engine client
    finally:
        await server.close()
        await engine.stop()
    assert len(engine.received) == 3


def test_the_data_path_on_uvloop() -> None:
    uvloop.run(_scenario())
