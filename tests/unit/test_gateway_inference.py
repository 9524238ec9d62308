"""The full path client -> gateway -> fake engine over loopback (with the real `openai` client too): bytes
and streams through unchanged, the model list, /healthz and /metrics, a client that leaves, the production
runner, and a conversation kept on one replica (validation: test_gateway_validation.py; forwarding itself:
test_gateway_relay.py, test_gateway_retries.py and test_gateway_picks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.adapters.sdnotify import Notifier
from nebula.core import keys, records
from nebula.core.config import GatewayConfig, NebulaConfig
from nebula.core.model import Phase, dumps
from nebula.services.gateway.app import build_gateway_app, serve_gateway, wait_for_first_listing
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, completion_bytes, engines, put_instance, sse_chunks, until
from tests.unit.gateway_api_fixtures import (
    CHAT,
    MODELS,
    USER_KEY,
    MakeStack,
    assert_openai_error,
    engine_fixture,  # noqa: F401 (the fixture engine, which make_stack takes)
    make_stack_fixture,  # noqa: F401 (the fixture make_stack)
    sha,
)


async def test_original_bytes_reach_the_engine_and_come_back_exact(make_stack: MakeStack) -> None:
    s = await make_stack()
    # Odd spacing and an unknown field: the gateway must forward the client's bytes, not a re-encoding.
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "x_custom": {"k": [1,2]}}'
    async with s.http.post(s.url("/v1/chat/completions"), data=raw,
                           headers={"Authorization": "Bearer whatever",
                                    "Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert await resp.read() == completion_bytes("a", "m")
    got = s.engine.received[-1]
    assert got.body == raw
    assert "Authorization" not in got.headers
    assert s.registry.get_sample_value("nebula_gateway_requests_total",
                                       {"model": "m", "endpoint": "chat/completions", "status": "200"}) == 1
    assert s.registry.get_sample_value("nebula_gateway_request_duration_seconds_count",
                                       {"model": "m", "endpoint": "chat/completions"}) == 1
    assert s.registry.get_sample_value("nebula_gateway_inflight_requests",
                                       {"endpoint": "chat/completions"}) == 0


async def test_sse_through_the_gateway_is_byte_exact(make_stack: MakeStack) -> None:
    s = await make_stack()
    async with s.http.post(s.url("/v1/chat/completions"), json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert await resp.read() == b"".join(sse_chunks("a", "m"))


async def test_openai_client_chat_and_stream(make_stack: MakeStack) -> None:
    s = await make_stack(api_key_hashes=(sha(USER_KEY),))
    client = openai.AsyncOpenAI(base_url=s.url("/v1"), api_key=USER_KEY, max_retries=0)
    try:
        done = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == "hello from a"
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "hello from a"
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["e", "m", "r"]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"
        bad = openai.AsyncOpenAI(base_url=s.url("/v1"), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await bad.close()
    finally:
        await client.close()


async def test_models_list_has_task_replicas_and_phases(make_stack: MakeStack) -> None:
    s = await make_stack()
    await until(lambda: s.gateway.app[GATEWAY].table.phases()["m"].get(Phase.STARTING) == 1)
    status, _, body = await s.call("GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["m"] == {"id": "m", "object": "model", "created": 0, "owned_by": "nebula",
                          "task": "generate", "replicas": 1, "ready": 1,
                          "phases": {"ready": 1, "starting": 1}}
    assert by_id["r"]["ready"] == 0 and by_id["r"]["phases"] == {}
    status, _, one = await s.call("GET", "/v1/models/e")
    assert status == 200 and one["task"] == "embed"
    status, _, _ = await s.call("GET", "/v1/models/nope")
    assert status == 404


async def test_healthz_and_metrics(make_stack: MakeStack) -> None:
    s = await make_stack()
    await s.call("POST", "/v1/chat/completions", CHAT)
    status, _, body = await s.call("GET", "/healthz")
    assert status == 200 and body["models_synced"] is True and body["models"] == 3
    async with s.http.get(s.url("/metrics")) as resp:
        text = await resp.text()
    assert 'nebula_gateway_requests_total{endpoint="chat/completions",model="m",status="200"} 1.0' in text


async def test_client_disconnect_cancels_the_engine_request(make_stack: MakeStack) -> None:
    s = await make_stack()
    s.engine.hold = asyncio.Event()
    request = asyncio.create_task(s.http.post(s.url("/v1/chat/completions"), json=CHAT).__aenter__())
    await asyncio.wait_for(s.engine.held.wait(), 5.0)
    request.cancel()
    await asyncio.wait_for(s.engine.cancelled.wait(), 5.0)
    gone = {"model": "m", "endpoint": "chat/completions", "status": "499"}
    await until(lambda: s.registry.get_sample_value("nebula_gateway_requests_total", gone) == 1)


@dataclass
class Served:
    port: int
    ready: Callable[[float], Awaitable[bytes]]
    """The next datagram the gateway sends systemd, within the given seconds."""
    task: asyncio.Task[None]
    registry: CollectorRegistry


@contextlib.asynccontextmanager
async def served_by_serve_gateway(tmp_path: Path, store: MemoryStore) -> AsyncIterator[Served]:
    """The production entry point on a free port, its sd_notify datagrams on a socket of the test's."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock, socket.socket() as probe:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.setblocking(False)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        registry = CollectorRegistry()
        serving = asyncio.create_task(serve_gateway(NebulaConfig(gateway=GatewayConfig(port=port)), store,
                                                    registry, notifier))
        try:
            yield Served(port, lambda s: asyncio.wait_for(loop.sock_recv(notify_sock, 4096), s), serving, registry)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            notifier.close()


async def test_serve_gateway_listens_and_notifies_ready(tmp_path: Path) -> None:
    async with served_by_serve_gateway(tmp_path, MemoryStore()) as served:
        assert (await served.ready(5.0)).startswith(b"READY=1")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{served.port}/healthz") as resp:
            assert resp.status == 200


async def test_a_starting_gateway_opens_its_port_once_it_knows_the_cluster(tmp_path: Path) -> None:
    # A restart under load: before its first listing every request would get 503 "not loaded yet"; with
    # the port closed a client reconnects instead (and READY=1 tells systemd the truth).
    store = MemoryStore()
    store.set_reachable(False)
    async with served_by_serve_gateway(tmp_path, store) as served:
        # The model mirror has tried to list and been refused by the store: the gateway is past its start.
        await until(lambda: (served.registry.get_sample_value(
            "nebula_cluster_mirror_restarts_total", {"prefix": records.MODELS.prefix, "cause": "store"}) or 0) > 0)
        with pytest.raises(OSError):  # refused: not listening yet
            await asyncio.open_connection("127.0.0.1", served.port)
        assert not served.task.done()
        store.set_reachable(True)
        assert (await served.ready(10.0)).startswith(b"READY=1")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{served.port}/healthz") as resp:
            assert resp.status == 200


async def test_with_the_store_away_the_gateway_serves_after_its_wait_and_says_why(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    store.set_reachable(False)
    app = build_gateway_app(GatewayConfig(), store, CollectorRegistry())
    gateway = GatewayServer(app)
    await gateway.start_server()  # runs the app's mirrors, which cannot list
    try:
        missing = await asyncio.wait_for(wait_for_first_listing(app[GATEWAY].mirrors, 0.3), 5.0)
    finally:
        await gateway.close()
    assert records.MODELS.prefix in missing and records.APIKEYS.prefix in missing
    assert "no first listing of" in caplog.text and "serving anyway" in caplog.text


async def test_gateway_started_without_the_store_answers_503_not_404() -> None:
    store = MemoryStore()
    store.set_reachable(False)
    # A key from the config passes while the stored keys are unknown (without it: 503 keys_not_loaded).
    gateway = GatewayServer(build_gateway_app(GatewayConfig(api_key_hashes=(sha(USER_KEY),)), store,
                                           CollectorRegistry()))
    await gateway.start_server()
    try:
        async with aiohttp.ClientSession() as http, http.post(gateway.make_url("/v1/chat/completions"), json=CHAT,
                                                              headers={"Authorization": f"Bearer {USER_KEY}"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert_openai_error(await resp.json(), 503, "models_not_loaded")
    finally:
        await gateway.close()


async def test_a_conversation_stays_on_one_replica_through_the_gateway() -> None:
    """The gateway keys each request on its prompt prefix and keeps a conversation on one replica's cache."""
    async for (a, b) in engines("a", "b"):
        await _check_affinity(a, b)


async def _check_affinity(a: FakeEngine, b: FakeEngine) -> None:
    store = MemoryStore()
    for spec in MODELS:
        await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
    await put_instance(store, "m", a.endpoint)
    await put_instance(store, "m:1", b.endpoint)
    gateway = GatewayServer(build_gateway_app(GatewayConfig(load_poll_s=0), store, CollectorRegistry()))
    await gateway.start_server()
    try:
        await until(lambda: len(gateway.app[GATEWAY].table.ready().get("m", [])) == 2
                    and "m" in gateway.app[GATEWAY].view.models)
        async with aiohttp.ClientSession() as http:
            async def chat(system: str, turn: str) -> None:
                body = {"model": "m", "messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": "first question"},
                                                   {"role": "assistant", "content": "answer"},
                                                   {"role": "user", "content": turn}]}
                async with http.post(gateway.make_url("/v1/chat/completions"), json=body) as resp:
                    assert resp.status == 200

            for i in range(6):
                await chat("you are helpful", f"turn {i}")
            assert sorted([len(a.received), len(b.received)]) == [0, 6], "a conversation was split"
            for i in range(12):
                await chat(f"persona {i}", "hello")
            assert len(a.received) > 0 and len(b.received) > 0, "distinct conversations were not spread"
    finally:
        await gateway.close()
