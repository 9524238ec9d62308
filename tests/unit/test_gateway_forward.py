"""The router app end to end over loopback: MemoryStore -> router -> real aiohttp fake engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from nebula.adapters.engine_metrics import EngineLoad
from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core.config import NebulaConfig, RouterConfig
from nebula.core.model import Phase
from nebula.core.routing import PREFIX_HEADER, rendezvous_home
from nebula.services.router.app import ROUTER, build_router_app, serve_router
from tests.unit.fake_engine import FakeEngine, completion_bytes, engines, put_instance, sse_chunks, until

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT_STREAM = json.dumps({"model": "m", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class Router:
    store: MemoryStore
    registry: CollectorRegistry
    server: TestServer
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def post(self, body: bytes, path: str = "/v1/chat/completions", model: str = "m",
             headers: dict[str, str] | None = None) -> aiohttp.client._RequestContextManager:
        sent = {"X-Nebula-Model": model, "Content-Type": "application/json", **(headers or {})}
        return self.http.post(self.url(path), data=body, headers=sent)

    def ready_count(self, model: str = "m") -> int:
        return len(self.server.app[ROUTER].table.ready().get(model, ()))

    def polled(self, endpoint: str) -> bool:
        return self.server.app[ROUTER].table.loads.sample(endpoint) is not None

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


MakeRouter = Callable[..., Awaitable[Router]]


@pytest.fixture
async def make_router() -> AsyncIterator[MakeRouter]:
    made: list[Router] = []

    async def make(**cfg: object) -> Router:
        store, registry = MemoryStore(), CollectorRegistry()
        app = build_router_app(RouterConfig(**{"connect_timeout_s": 1.0, **cfg}), store, registry)  # type: ignore[arg-type]
        server = TestServer(app)
        await server.start_server()
        r = Router(store, registry, server, aiohttp.ClientSession(auto_decompress=False))
        made.append(r)
        return r

    yield make
    for r in made:
        await r.http.close()
        await r.server.close()


@pytest.fixture
async def two() -> AsyncIterator[list[FakeEngine]]:
    async for started in engines("a", "b"):
        yield started


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_non_stream_is_proxied_byte_exact(make_router: MakeRouter, two: list[FakeEngine]) -> None:
    r = await make_router()
    a = two[0]
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT, path="/v1/chat/completions?x=1",
                      headers={"Authorization": "Bearer s3cret", "X-Request-Id": "req-1"}) as resp:
        assert resp.status == 200
        assert await resp.read() == completion_bytes("a", "m")
        assert resp.headers["X-Engine"] == "a"
    got = a.received[-1]
    assert got.body == CHAT and got.path == "/v1/chat/completions?x=1"
    assert got.headers["X-Request-Id"] == "req-1"
    assert "Authorization" not in got.headers and "X-Nebula-Model" not in got.headers
    assert r.metric("nebula_router_picks_total", {"model": "m", "instance": "m"}) == 1


async def test_sse_stream_is_relayed_byte_exact_as_it_arrives(make_router: MakeRouter,
                                                              two: list[FakeEngine]) -> None:
    r = await make_router()
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT_STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        pieces = [chunk async for chunk in resp.content.iter_any()]
    assert b"".join(pieces) == b"".join(sse_chunks("a", "m"))
    assert len(pieces) > 1  # streamed as the engine wrote it, not buffered into one body


async def test_refused_connection_is_retried_on_another_replica(make_router: MakeRouter,
                                                                two: list[FakeEngine]) -> None:
    r = await make_router()
    await put_instance(r.store, "m", closed_port_endpoint())
    await put_instance(r.store, "m:1", two[1].endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):  # round-robin makes the dead replica come first at least once
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert await resp.read() == completion_bytes("b", "m")
    assert r.metric("nebula_router_retries_total", {"model": "m", "reason": "connect"}) >= 1


async def test_engine_503_before_any_byte_is_retried(make_router: MakeRouter, two: list[FakeEngine]) -> None:
    r = await make_router()
    a, b = two
    a.status = 503
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["X-Engine"] == "b"
    assert r.metric("nebula_router_retries_total", {"model": "m", "reason": "503"}) >= 1


async def test_last_replica_503_is_passed_through(make_router: MakeRouter, two: list[FakeEngine]) -> None:
    r = await make_router()
    two[0].status = 503
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "busy"


async def test_all_replicas_unreachable_gives_503(make_router: MakeRouter) -> None:
    r = await make_router(max_attempts=2)
    await put_instance(r.store, "m", closed_port_endpoint())
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        err = (await resp.json())["error"]
        assert err["type"] == "server_error" and "could be reached" in err["message"]


async def test_no_ready_replica_gives_503_with_retry_after(make_router: MakeRouter,
                                                           two: list[FakeEngine]) -> None:
    r = await make_router()
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    await until(lambda: r.server.app[ROUTER].table.knows("m"))
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "model_not_ready"
    assert two[0].received == []
    assert r.metric("nebula_router_no_replica_total", {"model": "m"}) == 1


async def test_request_waits_for_a_replica_becoming_ready(make_router: MakeRouter,
                                                          two: list[FakeEngine]) -> None:
    r = await make_router(no_replica_wait_s=5.0)
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.sleep(0.1)
    assert not request.done()
    await put_instance(r.store, "m", two[0].endpoint, Phase.READY)
    resp = await asyncio.wait_for(request, 5.0)
    assert resp.status == 200
    resp.release()


async def test_replica_leaving_ready_gets_no_new_requests(make_router: MakeRouter,
                                                          two: list[FakeEngine]) -> None:
    r = await make_router()
    a, b = two
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    await put_instance(r.store, "m", a.endpoint, Phase.DRAINING)
    await until(lambda: r.ready_count() == 1)
    before = len(a.received)
    for _ in range(6):
        async with r.post(CHAT) as resp:
            assert resp.headers["X-Engine"] == "b"
    assert len(a.received) == before


async def test_least_outstanding_avoids_the_busy_replica(make_router: MakeRouter,
                                                         two: list[FakeEngine]) -> None:
    r = await make_router()
    a, b = two
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    b.hold = asyncio.Event()
    first = asyncio.create_task(r.post(CHAT).__aenter__())
    # Whichever replica got the first request is busy: the next ones all go to the other.
    await until(lambda: a.held.is_set() or b.held.is_set())
    busy, idle = (a, b) if a.held.is_set() else (b, a)
    idle.hold = None
    assert r.metric("nebula_router_inflight_requests",
                    {"model": "m", "instance": "m" if busy is a else "m:1", "endpoint": busy.endpoint}) == 1
    for _ in range(3):
        async with r.post(CHAT) as resp:
            assert resp.headers["X-Engine"] == idle.name
    assert busy.hold is not None
    busy.hold.set()
    resp = await first
    assert resp.status == 200
    resp.release()


async def engines_used(r: Router, n: int, headers: dict[str, str] | None = None) -> list[str]:
    """Send `n` requests one after the other; the engine that answered each."""
    used = []
    for _ in range(n):
        async with r.post(CHAT, headers=headers) as resp:
            assert resp.status == 200
            used.append(resp.headers["X-Engine"])
    return used


async def test_replica_with_a_queue_in_its_engine_gets_fewer_picks(make_router: MakeRouter,
                                                                   two: list[FakeEngine]) -> None:
    r = await make_router(load_poll_s=0.02)
    a, b = two
    a.waiting, a.running, a.kv_usage = 20, 4, 0.5
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and r.polled(a.endpoint) and r.polled(b.endpoint))
    assert await engines_used(r, 6) == ["b"] * 6
    assert r.metric("nebula_router_engine_waiting_requests", {"model": "m", "replica": "m"}) == 20
    assert r.metric("nebula_router_engine_running_requests", {"model": "m", "replica": "m"}) == 4
    assert r.metric("nebula_router_engine_kv_cache_usage", {"model": "m", "replica": "m"}) == 0.5
    assert r.metric("nebula_router_engine_waiting_requests", {"model": "m", "replica": "m:1"}) == 0
    # The queue drains: once polled again, both replicas share the traffic.
    a.waiting = 0
    await until(lambda: r.server.app[ROUTER].table.loads.loads().get(a.endpoint) == EngineLoad(0, 4, 0.5))
    assert set(await engines_used(r, 6)) == {"a", "b"}


async def test_same_prefix_goes_to_the_same_replica(make_router: MakeRouter, two: list[FakeEngine]) -> None:
    r = await make_router(load_poll_s=0)
    a, b = two
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    replicas = r.server.app[ROUTER].table.ready()["m"]
    # Two keys whose rendezvous homes differ, so the test shows the key (not luck) decides.
    home_of = {key: rendezvous_home(replicas, key) for key in (f"{i:016x}" for i in range(64))}
    key_a = next(k for k, h in home_of.items() if h is not None and h.endpoint == a.endpoint)
    key_b = next(k for k, h in home_of.items() if h is not None and h.endpoint == b.endpoint)
    assert await engines_used(r, 5, {PREFIX_HEADER: key_a}) == ["a"] * 5
    assert await engines_used(r, 5, {PREFIX_HEADER: key_b}) == ["b"] * 5
    assert PREFIX_HEADER not in a.received[-1].headers  # ours, not forwarded to the engine
    # Without a key (or with one that is not ours), requests take turns.
    assert set(await engines_used(r, 4)) == {"a", "b"}
    assert set(await engines_used(r, 4, {PREFIX_HEADER: "x" * 65})) == {"a", "b"}


async def test_prefix_affinity_yields_to_an_overloaded_home(make_router: MakeRouter,
                                                            two: list[FakeEngine]) -> None:
    r = await make_router(load_poll_s=0.02, kv_cache_threshold=0.9)
    a, b = two
    a.kv_usage = 0.95
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and r.polled(a.endpoint))
    replicas = r.server.app[ROUTER].table.ready()["m"]
    key_a = next(k for k in (f"{i:016x}" for i in range(64))
                 if (h := rendezvous_home(replicas, k)) is not None and h.endpoint == a.endpoint)
    assert await engines_used(r, 4, {PREFIX_HEADER: key_a}) == ["b"] * 4


async def test_failing_or_hanging_metrics_keep_routing_working(make_router: MakeRouter,
                                                               two: list[FakeEngine]) -> None:
    r = await make_router(load_poll_s=0.02, load_timeout_s=0.05)
    a, b = two
    a.metrics_status = 500
    b.metrics_hold = asyncio.Event()  # never answers: every poll of b times out
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and a.metrics_polls >= 2 and b.metrics_polls >= 2)
    assert r.metric("nebula_router_load_poll_failures_total", {}) >= 2
    assert not r.polled(a.endpoint) and not r.polled(b.endpoint)
    assert set(await engines_used(r, 4)) == {"a", "b"}  # load unknown: in-flight counts only
    async with r.http.get(r.url("/metrics")) as resp:
        assert "nebula_router_engine_waiting_requests{" not in await resp.text()


async def test_client_disconnect_cancels_the_upstream_request(make_router: MakeRouter,
                                                              two: list[FakeEngine]) -> None:
    r = await make_router()
    a = two[0]
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.wait_for(a.held.wait(), 5.0)
    request.cancel()  # drops the client connection
    await asyncio.wait_for(a.cancelled.wait(), 5.0)
    await until(lambda: r.server.app[ROUTER].table.inflight(a.endpoint) == 0)


async def test_missing_model_header_is_400(make_router: MakeRouter) -> None:
    r = await make_router()
    async with r.http.post(r.url("/v1/chat/completions"), data=CHAT) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "model"


async def test_replicas_view_healthz_and_metrics(make_router: MakeRouter, two: list[FakeEngine]) -> None:
    r = await make_router(load_poll_s=0)
    await put_instance(r.store, "m", two[0].endpoint)
    await put_instance(r.store, "m:1", two[1].endpoint, Phase.STARTING)
    await until(lambda: r.ready_count() == 1)
    async with r.http.get(r.url("/router/replicas")) as resp:
        view = await resp.json()
    assert view["synced"] is True
    assert view["models"]["m"]["phases"] == {"ready": 1, "starting": 1}
    assert view["models"]["m"]["ready"] == [{"instance": "m", "endpoint": two[0].endpoint, "task": "generate",
                                             "inflight": 0, "load": None}]
    async with r.http.get(r.url("/healthz")) as resp:
        assert (await resp.json())["ready_replicas"] == 1
    async with r.http.get(r.url("/metrics")) as resp:
        text = await resp.text()
    assert 'nebula_router_replicas{model="m",phase="starting"} 1.0' in text
    series = f'nebula_router_inflight_requests{{endpoint="{two[0].endpoint}",instance="m",model="m"}} 0.0'
    assert series in text


async def test_serve_router_notifies_and_cancels_upstream_when_the_client_leaves(
        tmp_path: Path, two: list[FakeEngine]) -> None:
    # The production runner, not TestServer: aiohttp only cancels handlers of departed clients when the
    # runner is built with handler_cancellation=True, which is what this checks.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        store = MemoryStore()
        a = two[0]
        a.hold = asyncio.Event()
        await put_instance(store, "m", a.endpoint)
        port = int(closed_port_endpoint().rsplit(":", 1)[1])
        serving = asyncio.create_task(serve_router(NebulaConfig(router=RouterConfig(port=port)), store,
                                                   CollectorRegistry(), notifier))
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0)
            assert ready.startswith(b"READY=1")
            async with aiohttp.ClientSession() as http:
                async def replicas() -> bool:
                    async with http.get(f"http://127.0.0.1:{port}/router/replicas") as resp:
                        return "m" in (await resp.json())["models"]

                await until(replicas)
                request = asyncio.create_task(http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT,
                    headers={"X-Nebula-Model": "m"}).__aenter__())
                await asyncio.wait_for(a.held.wait(), 5.0)
                request.cancel()
                await asyncio.wait_for(a.cancelled.wait(), 5.0)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            notifier.close()
        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0) == b"STOPPING=1"
