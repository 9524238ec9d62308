"""A real gateway with a fake engine behind it, in a process of its own, for the connection-flood test: its
RSS and CPU are then the gateway's alone, apart from the clients that flood it.

    python -m tests.harness.flood_gateway '{"max_connections": 4400}'

The argument is GatewayConfig fields as JSON. It serves model "m" on an in-memory store (no keys: open),
prints one JSON line {"port": ...} once listening, and runs until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.admission import raise_open_file_limit
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, put_instance, until


async def serve(cfg: GatewayConfig) -> None:
    raise_open_file_limit()  # as serve_gateway does
    engine = FakeEngine("a")
    await engine.start()
    store = MemoryStore()
    await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/models/x").to_dict()))
    await put_instance(store, "m", engine.endpoint)
    app = build_gateway_app(cfg, store, CollectorRegistry())
    server = GatewayServer(app)
    await server.start_server()
    state = app[GATEWAY]
    await until(lambda: state.auth.synced and bool(state.table.ready()), within_s=20)
    print(json.dumps({"port": server.port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin (or dies)
    await server.close()
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(serve(GatewayConfig(**{"load_poll_s": 0, **json.loads(sys.argv[1])})))
