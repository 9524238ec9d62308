"""A real gateway app on an in-memory store, served from its own thread and loop for the (blocking) CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.cli.main import main
from nebula.core.catalog import Catalog
from nebula.core.config import GatewayConfig
from nebula.services.gateway.app import build_gateway_app, gateway_site
from tests.harness.ports import free_port

ADMIN_KEY = "admin-secret"
T = TypeVar("T")


@dataclass
class ServedGateway:
    url: str
    store: MemoryStore
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def put(self, key: str, value: Mapping[str, Any] | str) -> None:
        raw = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        self.run(self.store.put(key, raw))

    def delete(self, key: str) -> None:
        self.run(self.store.delete(key))


@contextmanager
def served_gateway(cfg: GatewayConfig | None = None,
                   prepare: Callable[[MemoryStore], Awaitable[None]] | None = None,
                   cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None,
                   catalog: Catalog | None = None) -> Iterator[ServedGateway]:
    """Serve the gateway (by default with ADMIN_KEY as its admin key) until the block ends. `prepare` runs
    on the gateway's loop before it serves (to fill the store, start fake engines), `cleanup` after it
    stopped. Served as in production: the data-plane server in front of aiohttp, handlers cancelled when
    their client leaves."""
    cfg = cfg or GatewayConfig(admin_key_hashes=(hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),))
    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    box: list[tuple[web.AppRunner, MemoryStore]] = []

    async def start() -> None:
        store = MemoryStore()
        if prepare is not None:
            await prepare(store)
        runner = web.AppRunner(build_gateway_app(cfg, store, CollectorRegistry(), catalog=catalog),
                               handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        await gateway_site(runner, "127.0.0.1", port, shutdown_timeout_s=5.0).start()
        box.append((runner, store))
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    runner, store = box[0]
    try:
        yield ServedGateway(f"http://127.0.0.1:{port}", store, loop)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        if cleanup is not None:
            asyncio.run_coroutine_threadsafe(cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def run_cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str, key: str | None = ADMIN_KEY
            ) -> tuple[int, str, str]:
    """`nebula ARGV` against the gateway at `url` with `key` as the admin key: exit code, stdout, stderr."""
    env = {"NEBULA_URL": url, "NEBULA_CONFIG": "/nonexistent/nebula.toml", "NEBULA_ADMIN_KEY_FILE": "/nonexistent"}
    if key:
        env["NEBULA_ADMIN_KEY"] = key
    code = main(list(argv), env)
    out = capsys.readouterr()
    return code, out.out, out.err
