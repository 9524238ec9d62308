"""Prometheus service discovery: service records, the http_sd document, the registration under a lease,
and GET /v1/admin/prometheus/sd on a gateway app (admin scope; 503 while the store is down)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig, parse_config
from nebula.core.discovery import ServiceKind, ServiceRecord, advertised_address, sd_targets
from nebula.core.model import InstanceStatus, Phase, dumps, loads
from nebula.errors import ValidationError
from nebula.services.gateway.app import build_gateway_app
from nebula.services.registration import keep_registered, service_record
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import until

ADMIN_KEY = "sd-admin-secret"


def inst(name: str, model: str, endpoint: str, phase: Phase = Phase.READY, node: str = "n1") -> InstanceStatus:
    return InstanceStatus(instance=name, model=model, node=node, phase=phase, endpoint=endpoint)


GATEWAY = ServiceRecord(ServiceKind.GATEWAY, "n1", "10.0.0.1:8000")
SCHEDULER = ServiceRecord(ServiceKind.SCHEDULER, "n1", "10.0.0.1:8002")
AGENT = ServiceRecord(ServiceKind.NODE, "n2", "10.0.0.2:8003")


# --- records and addresses -------------------------------------------------------------------------------

def test_service_record_round_trips_and_rejects_bad_input() -> None:
    tls = ServiceRecord(ServiceKind.GATEWAY, "n1", "[::1]:8000", scheme="https")
    assert ServiceRecord.from_dict(loads(dumps(tls.to_dict()))) == tls
    for bad, field in (({"service": "router", "node": "n", "address": "a:1"}, "service"),
                       ({"service": "node", "node": "n", "address": "a:1/x"}, "address"),
                       ({"service": "node", "node": "n", "address": "a:1", "scheme": "ftp"}, "scheme"),
                       ({"service": "node", "address": "a:1"}, "node")):
        with pytest.raises(ValidationError) as e:
            ServiceRecord.from_dict(bad)
        assert e.value.field == field


def test_advertised_address_uses_the_node_address_for_a_wildcard_bind() -> None:
    assert advertised_address("127.0.0.1", 8000, "10.0.0.5") == "127.0.0.1:8000"
    assert advertised_address("0.0.0.0", 8003, "10.0.0.5") == "10.0.0.5:8003"
    assert advertised_address("::", 8003, "fd00::5") == "[fd00::5]:8003"
    assert advertised_address("::1", 8002, "10.0.0.5") == "[::1]:8002"


def test_service_record_of_each_service_follows_its_config() -> None:
    cfg = parse_config({"gateway": {"host": "0.0.0.0", "port": 9000}, "scheduler": {"port": 9002},
                        "node": {"address": "10.1.1.1", "port": 9003}}, {})
    assert service_record(cfg, ServiceKind.GATEWAY, "n7") == ServiceRecord(ServiceKind.GATEWAY, "n7", "10.1.1.1:9000")
    assert service_record(cfg, ServiceKind.SCHEDULER, "n7").address == "127.0.0.1:9002"
    assert service_record(cfg, ServiceKind.NODE, "n7").address == "127.0.0.1:9003"


# --- the document ----------------------------------------------------------------------------------------

def test_sd_document_lists_services_and_serving_engines_with_labels() -> None:
    doc = sd_targets([AGENT, SCHEDULER, GATEWAY], [
        inst("chat", "chat", "http://10.0.0.2:18000"),
        inst("chat:1", "chat", "http://10.0.0.3:18000/", Phase.DRAINING, node="n3"),
        inst("embed", "embed", "http://10.0.0.2:18001", Phase.STARTING),  # loading: no /metrics yet
        inst("gone", "gone", "http://10.0.0.2:18002", Phase.FAILED),
        inst("odd", "odd", ""),
    ])
    assert doc == [
        {"targets": ["10.0.0.2:18000"], "labels": {
            "job": "nebula-engine", "service": "engine", "node": "n1", "model": "chat", "instance": "chat",
            "__scheme__": "http", "__metrics_path__": "/metrics"}},
        {"targets": ["10.0.0.3:18000"], "labels": {
            "job": "nebula-engine", "service": "engine", "node": "n3", "model": "chat", "instance": "chat:1",
            "__scheme__": "http", "__metrics_path__": "/metrics"}},
        {"targets": ["10.0.0.1:8000"], "labels": {
            "job": "nebula-gateway", "service": "gateway", "node": "n1", "__scheme__": "http",
            "__metrics_path__": "/metrics"}},
        {"targets": ["10.0.0.2:8003"], "labels": {
            "job": "nebula-node", "service": "node", "node": "n2", "__scheme__": "http",
            "__metrics_path__": "/metrics"}},
        {"targets": ["10.0.0.1:8002"], "labels": {
            "job": "nebula-scheduler", "service": "scheduler", "node": "n1", "__scheme__": "http",
            "__metrics_path__": "/metrics"}},
    ]


def test_sd_document_lists_one_engine_per_endpoint_and_nothing_for_an_empty_cluster() -> None:
    stale, current = inst("m:3", "m", "http://h:1"), inst("m:1", "m", "http://h:1")
    for order in ([stale, current], [current, stale]):
        (group,) = sd_targets([], order)
        assert group["labels"]["instance"] == "m:1"
    assert sd_targets([], []) == []


# --- registration ----------------------------------------------------------------------------------------

class Ticks:
    """The lease keeper's sleep: it returns only when the test lets one tick through."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, _: float) -> None:
        await self.queue.get()


async def test_registration_holds_the_record_under_a_lease_and_removes_it_on_stop() -> None:
    store, ticks = MemoryStore(), Ticks()
    key = keys.service_key("node", AGENT.node, AGENT.address)

    async def registered() -> bool:
        return await store.get(key) is not None

    task = asyncio.create_task(keep_registered(store, AGENT, 5, sleep=ticks))
    try:
        await until(registered)
        first = await store.get(key)
        assert first is not None and first.lease and ServiceRecord.from_dict(loads(first.value)) == AGENT

        await store.revoke_lease(first.lease)  # the lease expired (the process was cut off too long)
        assert await store.get(key) is None
        ticks.queue.put_nowait(None)
        await until(registered)
        again = await store.get(key)
        assert again is not None and again.lease not in (0, first.lease)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await store.get(key) is None  # a clean stop takes the record away at once


# --- the endpoint ----------------------------------------------------------------------------------------

@pytest.fixture
async def sd_gateway() -> AsyncIterator[tuple[MemoryStore, GatewayServer, aiohttp.ClientSession]]:
    store = MemoryStore()
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    server = GatewayServer(build_gateway_app(GatewayConfig(admin_key_hashes=(digest,), load_poll_s=0), store,
                                          CollectorRegistry()))
    await server.start_server()
    http = aiohttp.ClientSession()
    try:
        yield store, server, http
    finally:
        await http.close()
        await server.close()


async def test_sd_endpoint_needs_an_admin_key_and_answers_from_the_store(
        sd_gateway: tuple[MemoryStore, GatewayServer, aiohttp.ClientSession]) -> None:
    store, server, http = sd_gateway
    url = str(server.make_url("/v1/admin/prometheus/sd"))
    await store.put(keys.service_key("gateway", GATEWAY.node, GATEWAY.address), dumps(GATEWAY.to_dict()))
    await store.put(keys.service_key("node", "n9", "junk"), b"{not json")
    await store.put(keys.instance_key("chat"), dumps(inst("chat", "chat", "http://10.0.0.2:18000").to_dict()))

    async with http.get(url) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(url, headers=auth) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
    assert [(g["targets"], g["labels"]["job"]) for g in doc] == [
        (["10.0.0.2:18000"], "nebula-engine"), (["10.0.0.1:8000"], "nebula-gateway")]

    store.set_reachable(False)  # Prometheus keeps its last targets on an error; it must not get an empty list
    async with http.get(url, headers=auth) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
