"""The gateway's forwarding over loopback: MemoryStore -> gateway (pick, retry, relay) -> real aiohttp fake
engines. Validation, keys and the admin API are test_gateway_api's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.engine_load import EngineLoad
from nebula.core.model import ModelSpec, Phase, dumps
from nebula.core.routing import prefix_key, rendezvous_home
from nebula.services.gateway.app import build_gateway_app, serve_gateway
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.state import GATEWAY
from nebula.services.http.relay import forward_headers
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, completion_bytes, engines, put_instance, sse_chunks, until


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


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
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


@pytest.fixture
async def two() -> AsyncIterator[list[FakeEngine]]:
    async for started in engines("a", "b"):
        yield started


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_non_stream_is_proxied_byte_exact(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
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
    assert "Authorization" not in got.headers
    assert r.metric("nebula_gateway_picks_total", {"model": "m", "instance": "m"}) == 1


async def test_sse_stream_is_relayed_byte_exact_as_it_arrives(make_gateway: MakeGateway,
                                                              two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT_STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        pieces = [chunk async for chunk in resp.content.iter_any()]
    assert b"".join(pieces) == b"".join(sse_chunks("a", "m"))
    assert len(pieces) > 1  # streamed as the engine wrote it, not buffered into one body


async def test_refused_connection_is_retried_on_another_replica(make_gateway: MakeGateway,
                                                                two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", closed_port_endpoint())
    await put_instance(r.store, "m:1", two[1].endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):  # round-robin makes the dead replica come first at least once
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert await resp.read() == completion_bytes("b", "m")
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "connect"}) >= 1


@contextlib.asynccontextmanager
async def raw_engine(behave: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[str]:
    """An engine that misbehaves at the socket level, as `behave` does with each connection: its endpoint."""
    server = await asyncio.start_server(behave, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def assert_replayed_on_b(r: Gateway, bad: str, b: FakeEngine, reason: str) -> None:
    """Replicas `m` (at `bad`) and `m:1` (engine b): every request ends as b's answer, some after a retry."""
    await put_instance(r.store, "m", bad)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):  # round-robin makes the bad replica come first at least once
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert await resp.read() == completion_bytes("b", "m")
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": reason}) >= 1


async def test_engine_dying_before_it_answers_is_retried(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    """An engine that takes the request and dies (connection closed, no response): replayed on another."""
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.close()

    async with raw_engine(die) as dying:
        await assert_replayed_on_b(await make_gateway(), dying, two[1], "disconnect")


async def test_body_breaking_off_before_anything_was_relayed_is_retried(make_gateway: MakeGateway,
                                                                        two: list[FakeEngine]) -> None:
    """Headers promise 1000 bytes, 10 come, the connection closes: a small body is relayed whole, so the
    client has seen nothing yet and another replica answers instead; with no other replica, a clean 502."""
    async def break_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"partial"')
        await writer.drain()
        writer.close()

    async with raw_engine(break_off) as broken:
        r = await make_gateway()
        await put_instance(r.store, "m", broken)
        await until(lambda: r.ready_count() == 1)
        async with r.post(CHAT) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_error"
        await assert_replayed_on_b(r, broken, two[1], "broken")


async def test_stream_dying_before_its_first_token_is_retried(make_gateway: MakeGateway,
                                                             two: list[FakeEngine]) -> None:
    """An engine sends a streamed answer's head at once and its first token after prefill; one that dies in
    between has given the client nothing, so another replica answers the whole stream."""
    async def head_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_engine(head_then_die) as dying:
        r = await make_gateway()
        await put_instance(r.store, "m", dying)
        await put_instance(r.store, "m:1", two[1].endpoint)
        await until(lambda: r.ready_count() == 2)
        stream = json.dumps({**json.loads(CHAT), "stream": True}).encode()  # no prefix: picks take turns
        for _ in range(4):  # round-robin makes the dying replica come first at least once
            async with r.post(stream) as resp:
                assert resp.status == 200 and resp.headers["X-Engine"] == "b"
                assert await resp.read() == b"".join(sse_chunks("b", "m"))
        assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "broken"}) >= 1


async def test_engine_503_before_any_byte_is_retried(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
    a, b = two
    a.status = 503
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    for _ in range(4):
        async with r.post(CHAT) as resp:
            assert resp.status == 200
            assert resp.headers["X-Engine"] == "b"
    assert r.metric("nebula_gateway_retries_total", {"model": "m", "reason": "503"}) >= 1


async def test_last_replica_503_is_passed_through(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway()
    two[0].status = 503
    await put_instance(r.store, "m", two[0].endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "busy"


async def test_all_replicas_unreachable_gives_503(make_gateway: MakeGateway) -> None:
    r = await make_gateway(max_attempts=2)
    await put_instance(r.store, "m", closed_port_endpoint())
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        err = (await resp.json())["error"]
        assert err["type"] == "server_error" and "could be reached" in err["message"]


async def test_no_ready_replica_gives_503_with_retry_after(make_gateway: MakeGateway,
                                                           two: list[FakeEngine]) -> None:
    r = await make_gateway()
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    await until(lambda: r.table.knows("m"))
    async with r.post(CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "model_not_ready"
    assert two[0].received == []
    assert r.metric("nebula_gateway_no_replica_total", {"model": "m"}) == 1


async def test_request_waits_for_a_replica_becoming_ready(make_gateway: MakeGateway,
                                                          two: list[FakeEngine]) -> None:
    r = await make_gateway(no_replica_wait_s=5.0)
    await put_instance(r.store, "m", two[0].endpoint, Phase.STARTING)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.sleep(0.1)
    assert not request.done()
    await put_instance(r.store, "m", two[0].endpoint, Phase.READY)
    resp = await asyncio.wait_for(request, 5.0)
    assert resp.status == 200
    resp.release()


async def test_replica_leaving_ready_gets_no_new_requests(make_gateway: MakeGateway,
                                                          two: list[FakeEngine]) -> None:
    r = await make_gateway()
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


async def test_least_outstanding_avoids_the_busy_replica(make_gateway: MakeGateway,
                                                         two: list[FakeEngine]) -> None:
    r = await make_gateway()
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
    assert r.metric("nebula_gateway_replica_inflight", {"model": "m", "instance": "m" if busy is a else "m:1"}) == 1
    for _ in range(3):
        async with r.post(CHAT) as resp:
            assert resp.headers["X-Engine"] == idle.name
    assert busy.hold is not None
    busy.hold.set()
    resp = await first
    assert resp.status == 200
    resp.release()


async def engines_used(r: Gateway, n: int, body: bytes = CHAT) -> list[str]:
    """Send `n` requests one after the other; the engine that answered each."""
    used = []
    for _ in range(n):
        async with r.post(body) as resp:
            assert resp.status == 200
            used.append(resp.headers["X-Engine"])
    return used


async def test_replica_with_a_queue_in_its_engine_gets_fewer_picks(make_gateway: MakeGateway,
                                                                   two: list[FakeEngine]) -> None:
    r = await make_gateway(load_poll_s=0.02)
    a, b = two
    a.waiting, a.running, a.kv_usage = 20, 4, 0.5
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and r.polled(a.endpoint) and r.polled(b.endpoint))
    assert await engines_used(r, 6) == ["b"] * 6
    assert r.metric("nebula_gateway_engine_waiting_requests", {"model": "m", "replica": "m"}) == 20
    assert r.metric("nebula_gateway_engine_running_requests", {"model": "m", "replica": "m"}) == 4
    assert r.metric("nebula_gateway_engine_kv_cache_usage", {"model": "m", "replica": "m"}) == 0.5
    assert r.metric("nebula_gateway_engine_waiting_requests", {"model": "m", "replica": "m:1"}) == 0
    # The queue drains: once polled again, both replicas share the traffic.
    a.waiting = 0
    await until(lambda: r.table.loads.loads().get(a.endpoint) == EngineLoad(0, 4, 0.5))
    assert set(await engines_used(r, 6)) == {"a", "b"}


def conversation_homed_on(r: Gateway, endpoint: str) -> bytes:
    """A chat body whose prefix key's rendezvous home is the replica at `endpoint`."""
    replicas = r.table.ready()["m"]
    for i in range(64):
        body = chat(f"conversation {i}")
        home = rendezvous_home(replicas, prefix_key(json.loads(body)) or "")
        if home is not None and home.endpoint == endpoint:
            return body
    raise AssertionError(f"no conversation homed on {endpoint}")


async def test_same_prefix_goes_to_the_same_replica(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway(load_poll_s=0)
    a, b = two
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2)
    # Two conversations whose rendezvous homes differ, so the test shows the prefix (not luck) decides.
    conv_a = conversation_homed_on(r, a.endpoint)
    conv_b = conversation_homed_on(r, b.endpoint)
    assert await engines_used(r, 5, conv_a) == ["a"] * 5
    assert await engines_used(r, 5, conv_b) == ["b"] * 5
    # A later turn of the same conversation (same first user message) stays home too.
    later = json.loads(conv_a)
    later["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    assert await engines_used(r, 3, json.dumps(later).encode()) == ["a"] * 3
    # Without a prefix (no text to key on), requests take turns.
    assert set(await engines_used(r, 4)) == {"a", "b"}


async def test_prefix_affinity_yields_to_an_overloaded_home(make_gateway: MakeGateway,
                                                            two: list[FakeEngine]) -> None:
    r = await make_gateway(load_poll_s=0.02, kv_cache_threshold=0.9)
    a, b = two
    a.kv_usage = 0.95
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and r.polled(a.endpoint))
    assert await engines_used(r, 4, conversation_homed_on(r, a.endpoint)) == ["b"] * 4


async def test_failing_or_hanging_metrics_keep_routing_working(make_gateway: MakeGateway,
                                                               two: list[FakeEngine]) -> None:
    r = await make_gateway(load_poll_s=0.02, load_timeout_s=0.05)
    a, b = two
    a.metrics_status = 500
    b.metrics_hold = asyncio.Event()  # never answers: every poll of b times out
    await put_instance(r.store, "m", a.endpoint)
    await put_instance(r.store, "m:1", b.endpoint)
    await until(lambda: r.ready_count() == 2 and a.metrics_polls >= 2 and b.metrics_polls >= 2)
    assert r.metric("nebula_gateway_load_poll_failures_total", {}) >= 2
    assert not r.polled(a.endpoint) and not r.polled(b.endpoint)
    assert set(await engines_used(r, 4)) == {"a", "b"}  # load unknown: in-flight counts only
    async with r.http.get(r.url("/metrics")) as resp:
        assert "nebula_gateway_engine_waiting_requests{" not in await resp.text()


async def test_client_disconnect_cancels_the_upstream_request(make_gateway: MakeGateway,
                                                              two: list[FakeEngine]) -> None:
    r = await make_gateway()
    a = two[0]
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    request = asyncio.create_task(r.post(CHAT).__aenter__())
    await asyncio.wait_for(a.held.wait(), 5.0)
    request.cancel()  # drops the client connection
    await asyncio.wait_for(a.cancelled.wait(), 5.0)
    await until(lambda: r.table.inflight(a.endpoint) == 0)


async def test_timeout_before_the_answer_is_504(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway(upstream_timeout_s=0.2)
    a = two[0]
    a.hold = asyncio.Event()
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    async with r.post(CHAT) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "timeout"
    await until(lambda: r.table.inflight(a.endpoint) == 0)


async def test_replicas_view_healthz_and_metrics(make_gateway: MakeGateway, two: list[FakeEngine]) -> None:
    r = await make_gateway(load_poll_s=0)
    await put_instance(r.store, "m", two[0].endpoint)
    await put_instance(r.store, "m:1", two[1].endpoint, Phase.STARTING)
    await until(lambda: r.ready_count() == 1)
    async with r.http.get(r.url("/v1/admin/replicas")) as resp:
        view = await resp.json()
    assert view["synced"] is True
    assert view["models"]["m"]["phases"] == {"ready": 1, "starting": 1}
    assert view["models"]["m"]["ready"] == [{"instance": "m", "endpoint": two[0].endpoint, "task": "generate",
                                             "inflight": 0, "load": None}]
    async with r.http.get(r.url("/healthz")) as resp:
        health = await resp.json()
        assert health["ready_replicas"] == 1 and health["replicas_synced"] is True
    async with r.http.get(r.url("/metrics")) as resp:
        text = await resp.text()
    assert 'nebula_gateway_replicas{model="m",phase="starting"} 1.0' in text
    assert 'nebula_gateway_replica_inflight{instance="m",model="m"} 0.0' in text
    # /metrics needs no key: it names replicas, never the address of an engine (which has no auth of its own).
    assert two[0].endpoint.split("//")[1] not in text and two[1].endpoint.split("//")[1] not in text


async def test_replicas_view_is_admin_scoped(two: list[FakeEngine]) -> None:
    admin = hashlib.sha256(b"admin-secret").hexdigest()
    user = hashlib.sha256(b"user-secret").hexdigest()
    store = MemoryStore()
    server = GatewayServer(build_gateway_app(GatewayConfig(admin_key_hashes=(admin,), api_key_hashes=(user,)),
                                          store, CollectorRegistry()))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            for key, status in ((None, 401), ("user-secret", 403), ("admin-secret", 200)):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with http.get(server.make_url("/v1/admin/replicas"), headers=headers) as resp:
                    assert resp.status == status, key
    finally:
        await server.close()


async def test_serve_gateway_notifies_and_cancels_upstream_when_the_client_leaves(
        tmp_path: Path, two: list[FakeEngine]) -> None:
    # The production runner, not GatewayServer: aiohttp only cancels handlers of departed clients when the
    # runner is built with handler_cancellation=True, which is what this checks.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        store = MemoryStore()
        await put_model(store)
        a = two[0]
        a.hold = asyncio.Event()
        await put_instance(store, "m", a.endpoint)
        port = int(closed_port_endpoint().rsplit(":", 1)[1])
        serving = asyncio.create_task(serve_gateway(NebulaConfig(gateway=GatewayConfig(port=port)), store,
                                                    CollectorRegistry(), notifier))
        try:
            ready = await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0)
            assert ready.startswith(b"READY=1")
            async with aiohttp.ClientSession() as http:
                async def replicas() -> bool:
                    async with http.get(f"http://127.0.0.1:{port}/v1/admin/replicas") as resp:
                        return bool((await resp.json())["models"].get("m", {}).get("ready"))

                await until(replicas)
                request = asyncio.create_task(http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT).__aenter__())
                await asyncio.wait_for(a.held.wait(), 5.0)
                request.cancel()
                await asyncio.wait_for(a.cancelled.wait(), 5.0)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            notifier.close()
        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 5.0) == b"STOPPING=1"


def test_forwarded_headers_are_end_to_end_only_and_json() -> None:
    sent = CIMultiDict([("Host", "gw"), ("Authorization", "Bearer k"), ("content-type", "text/plain"),
                        ("Cookie", "nebula_console=t"), ("X-Nebula-CSRF", "c"),
                        ("X-Tag", "a"), ("X-Tag", "b"), ("Connection", "keep-alive"), ("Content-Length", "2")])
    assert forward_headers(sent, {"Content-Type": "application/json"}) == {
        "X-Tag": "a, b", "Accept-Encoding": "identity", "Content-Type": "application/json"}
    assert forward_headers(CIMultiDict([("accept-encoding", "gzip")]))["accept-encoding"] == "gzip"


async def test_a_connection_aiohttp_takes_over_keeps_serving_inference(make_gateway: MakeGateway,
                                                                       two: list[FakeEngine]) -> None:
    # The openai client keeps one connection for everything: an admin or /healthz call in the middle
    # hands it to aiohttp, whose OpenAI routes then answer the same way (request id, relay, streaming).
    r = await make_gateway(load_poll_s=0)
    a = two[0]
    await put_instance(r.store, "m", a.endpoint)
    await until(lambda: r.ready_count() == 1)
    site = r.server.site
    assert site is not None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        async def chat_on(path: str = "/v1/chat/completions", body: bytes = CHAT) -> tuple[str, bytes]:
            async with http.post(r.url(path), data=body, headers={"X-Request-ID": "req-1"}) as resp:
                assert resp.status == 200, await resp.text()
                return resp.headers["X-Request-ID"], await resp.read()

        assert (await chat_on())[0] == "req-1"
        assert site.connections == 1  # on the data-plane server
        async with http.get(r.url("/healthz")) as resp:
            assert resp.status == 200
        assert site.connections == 0  # aiohttp's now
        rid, body = await chat_on()
        assert rid == "req-1" and json.loads(body)["object"] == "chat.completion"
        rid, body = await chat_on(body=CHAT_STREAM)
        assert rid == "req-1" and body.rstrip().endswith(b"data: [DONE]")
        async with http.post(r.url("/v1/chat/completions"), data=b"{not json") as resp:
            assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    assert [m.headers["X-Request-ID"] for m in a.received] == ["req-1"] * 3


async def test_big_request_heads_get_the_openai_error_shape(make_gateway: MakeGateway) -> None:
    r = await make_gateway(load_poll_s=0)
    async with r.post(CHAT, headers={"X-Padding": "x" * 70_000}) as resp:
        assert resp.status == 431
        error = (await resp.json())["error"]
        assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
