"""The gateway's picks over loopback: which replica answers (ready ones only, least outstanding, engine load,
prefix affinity), and the replicas view that shows them (the relay itself: test_gateway_relay.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core.config import GatewayConfig
from nebula.core.engine_load import EngineLoad
from nebula.core.model import Phase
from nebula.core.routing import prefix_key, rendezvous_home
from nebula.services.gateway.app import build_gateway_app
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, put_instance, until
from tests.unit.gateway_forward_fixtures import (
    CHAT,
    Gateway,
    MakeGateway,
    chat,
    make_gateway_fixture,  # noqa: F401 (the fixture make_gateway)
    two_fixture,  # noqa: F401 (the fixture two)
)


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
