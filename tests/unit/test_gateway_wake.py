"""Wake on request through the gateway (both of its HTTP servers): MemoryStore -> gateway -> a real aiohttp fake
engine that the test makes READY the way a node agent would. Requests for an elastic model with no ready replica
are held, cause one wake request, and go on once a replica is ready; a hold runs out as 503 model_waking in the
client's shape; a held stream keeps its connection alive with SSE comments that the openai SDK ignores."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig
from nebula.core.elastic import ScalingPolicy, WakeRequest
from nebula.core.lora import AdapterSpec
from nebula.core.model import InstanceStatus, ModelSpec, Phase, Task, dumps
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.load_report import LoadAccounting
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.state import GATEWAY, GatewayState
from nebula.services.gateway.wake import WakeMetrics, Waker
from tests.harness.gateway_server import GatewayServer
from tests.unit.fake_engine import FakeEngine, engines, put_instance, until
from tests.unit.test_audio_form import WAV, encode
from tests.unit.test_load_report import Recorder

ELASTIC = ModelSpec(name="z", source="org/z", scaling=ScalingPolicy(min_replicas=0, max_replicas=2, idle_unload_s=60))
FIXED = ModelSpec(name="m", source="org/m")


def chat(model: str = "z", stream: bool = False) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """A chunked request body, which the data-plane server hands to aiohttp: the other HTTP stack."""
    yield body


@dataclass
class Gateway:
    store: MemoryStore
    registry: CollectorRegistry
    server: GatewayServer
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    @property
    def st(self) -> GatewayState:
        return self.server.app[GATEWAY]

    def post(self, body: bytes, path: str = "/v1/chat/completions", aiohttp_stack: bool = False,
             headers: dict[str, str] | None = None) -> Any:
        data: Any = chunked(body) if aiohttp_stack else body
        return self.http.post(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                   **(headers or {})})

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def wake_versions(self) -> int:
        kv = await self.store.get(keys.wake_key("z"))
        return 0 if kv is None else kv.version


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    made: list[Gateway] = []

    async def make(**cfg: Any) -> Gateway:
        store, registry = MemoryStore(), CollectorRegistry()
        for spec in (ELASTIC, FIXED):
            await store.put(keys.model_key(spec.name), dumps(spec.to_dict()))
        app = build_gateway_app(GatewayConfig(**{"load_poll_s": 0, "connect_timeout_s": 1.0, **cfg}), store,
                                registry, reporter="n1.1")
        server = GatewayServer(app)
        await server.start_server()
        g = Gateway(store, registry, server, aiohttp.ClientSession())
        made.append(g)
        await until(lambda: len(server.app[GATEWAY].view.models) == 2 and server.app[GATEWAY].table.synced)
        return g

    yield make
    for g in made:
        await g.http.close()
        await g.server.close()


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for started in engines("a"):
        yield started[0]


async def models(g: Gateway) -> dict[str, dict[str, Any]]:
    async with g.http.get(g.url + "/v1/models") as resp:
        return {m["id"]: m for m in (await resp.json())["data"]}


async def status_of(g: Gateway, body: bytes, **kw: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with g.post(body, **kw) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


@pytest.mark.parametrize("aiohttp_stack", [False, True], ids=["data-plane", "aiohttp"])
async def test_first_requests_are_held_ask_one_wake_and_go_on_when_a_replica_is_ready(
        make_gateway: MakeGateway, engine: FakeEngine, aiohttp_stack: bool) -> None:
    g = await make_gateway(wake_wait_s=30)
    assert (await models(g))["z"]["state"] == "idle" and "state" not in (await models(g))["m"]
    n = 50
    calls = [asyncio.create_task(status_of(g, chat(), aiohttp_stack=aiohttp_stack)) for _ in range(n)]
    await until(lambda: g.st.load.held.get("z") == n)
    assert g.metric("nebula_gateway_held_requests", {"model": "z"}) == n
    await until(lambda: g.metric("nebula_gateway_wakes_requested_total", {"model": "z"}) == 1)
    assert await g.wake_versions() == 1  # one create, whatever the number held
    wake = json.loads((await g.store.get(keys.wake_key("z"))).value)  # type: ignore[union-attr]
    assert wake["model"] == "z" and wake["by"] == "n1.1" and wake["at"] > 0
    await until(lambda: "z" in g.st.view.wakes)
    assert (await models(g))["z"]["state"] == "waking"
    assert not any(c.done() for c in calls)

    await put_instance(g.store, "z:1", engine.endpoint, model="z")  # the agent reports the woken replica
    answers = await asyncio.gather(*calls)
    assert [s for s, _, _ in answers] == [200] * n
    assert all(a["choices"][0]["message"]["content"] == "hello from a" for _, a, _ in answers)
    assert g.st.load.held["z"] == 0 and g.metric("nebula_gateway_held_requests", {"model": "z"}) == 0
    assert g.metric("nebula_gateway_wake_hold_seconds_count", {"model": "z", "outcome": "ready"}) == n
    assert g.st.load.inflight["z"] == 0 and g.st.load.last_request["z"] > 0
    assert (await models(g))["z"]["state"] == "ready"
    assert await g.wake_versions() == 1


async def test_a_wake_the_scheduler_took_is_not_asked_again_by_the_same_hold(make_gateway: MakeGateway,
                                                                              engine: FakeEngine) -> None:
    g = await make_gateway(wake_wait_s=30)
    first = asyncio.create_task(status_of(g, chat()))
    await until(lambda: g.metric("nebula_gateway_wakes_requested_total", {"model": "z"}) == 1)
    await g.store.delete(keys.wake_key("z"))  # the scheduler leader acted on it
    more = [asyncio.create_task(status_of(g, chat())) for _ in range(5)]
    await until(lambda: g.st.load.held.get("z") == 6)
    await asyncio.sleep(0.05)
    assert await g.wake_versions() == 0 and g.metric("nebula_gateway_wakes_requested_total", {"model": "z"}) == 1
    await put_instance(g.store, "z:1", engine.endpoint, model="z")
    assert [s for s, _, _ in await asyncio.gather(first, *more)] == [200] * 6


async def test_a_request_for_an_adapter_of_an_elastic_base_at_zero_wakes_the_base_and_waits_for_the_adapter(
        make_gateway: MakeGateway, engine: FakeEngine) -> None:
    g = await make_gateway(wake_wait_s=30)
    await g.store.put(keys.adapter_key("tone"), dumps(AdapterSpec("tone", "z", "/adapters/tone").to_dict()))
    await until(lambda: "tone" in g.st.view.adapters)
    call = asyncio.create_task(status_of(g, chat(model="tone")))
    await until(lambda: g.st.load.held.get("z") == 1)
    await until(lambda: g.metric("nebula_gateway_wakes_requested_total", {"model": "z"}) == 1)

    async def replica(adapters: tuple[str, ...]) -> None:
        st = InstanceStatus(instance="z", model="z", node="n1", phase=Phase.READY, endpoint=engine.endpoint,
                            adapters=adapters)
        await g.store.put(keys.instance_key("z"), dumps(st.to_dict()))

    await replica(())  # the base is awake; its agent has not loaded the adapter yet
    await until(lambda: g.st.table.has_candidate("z"))
    await asyncio.sleep(0.1)
    assert not call.done(), "held on until a replica has the adapter"
    await replica(("tone",))
    status, answer, _ = await call
    assert status == 200 and answer["choices"][0]["message"]["content"] == "hello from a"
    assert json.loads(engine.received[-1].body)["model"] == "tone"  # vLLM serves the adapter by its own name
    assert g.metric("nebula_gateway_wake_hold_seconds_count", {"model": "z", "outcome": "ready"}) == 1


async def test_a_model_that_is_not_elastic_is_answered_as_before(make_gateway: MakeGateway) -> None:
    g = await make_gateway(wake_wait_s=30)
    status, body, headers = await status_of(g, chat("m"))
    assert status == 503 and body["error"]["code"] == "model_not_ready" and headers["Retry-After"] == "1"
    assert await g.store.get(keys.wake_key("m")) is None and g.st.load.held == {}


@pytest.mark.parametrize("aiohttp_stack", [False, True], ids=["data-plane", "aiohttp"])
async def test_a_hold_runs_out_as_503_model_waking_in_the_clients_shape(make_gateway: MakeGateway,
                                                                        aiohttp_stack: bool) -> None:
    g = await make_gateway(wake_wait_s=0.3)
    started = time.monotonic()
    status, body, headers = await status_of(g, chat(), aiohttp_stack=aiohttp_stack)
    assert status == 503 and time.monotonic() - started >= 0.3
    assert body["error"]["code"] == "model_waking" and "retry in 1s" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    anthropic_body = json.dumps({"model": "z", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    status, body, _ = await status_of(g, anthropic_body.encode(), path="/v1/messages", aiohttp_stack=aiohttp_stack)
    assert status == 503 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "waking up" in body["error"]["message"]
    assert g.metric("nebula_gateway_wake_hold_seconds_count", {"model": "z", "outcome": "timeout"}) == 2
    assert g.st.load.held["z"] == 0


async def test_beyond_max_held_requests_the_answer_is_503_at_once(make_gateway: MakeGateway) -> None:
    g = await make_gateway(wake_wait_s=30, max_held_requests=2)
    held = [asyncio.create_task(status_of(g, chat())) for _ in range(2)]
    await until(lambda: g.st.load.held.get("z") == 2)
    status, body, headers = await status_of(g, chat())
    assert status == 503 and "max_held_requests" in body["error"]["message"] and "Retry-After" in headers
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    await until(lambda: g.st.load.held.get("z") == 0)  # a client that leaves is no longer held
    assert g.metric("nebula_gateway_wake_hold_seconds_count", {"model": "z", "outcome": "gone"}) == 2


@pytest.mark.parametrize("aiohttp_stack", [False, True], ids=["data-plane", "aiohttp"])
async def test_a_held_stream_gets_keepalive_comments_and_the_openai_sdk_parses_it(
        make_gateway: MakeGateway, engine: FakeEngine, aiohttp_stack: bool) -> None:
    g = await make_gateway(wake_wait_s=30, wake_keepalive_s=0.05)
    async with g.post(chat(stream=True), aiohttp_stack=aiohttp_stack) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert first == b": waking z\n\n"
        await put_instance(g.store, "z:1", engine.endpoint, model="z")
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n") and b"hello" not in first
    assert "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in rest.split(b"\n")
                   if line.startswith(b"data: {")) == "hello from a"
    await g.store.delete(keys.instance_key("z:1"))
    await until(lambda: not g.st.table.has_candidate("z"))

    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(model="z", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    await asyncio.sleep(0.2)  # a few keep-alive comments reach the SDK first
    await put_instance(g.store, "z:1", engine.endpoint, model="z")
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hello from a"
    await client.close()


async def test_a_held_stream_whose_wake_fails_ends_with_an_error_the_sdk_raises(make_gateway: MakeGateway) -> None:
    g = await make_gateway(wake_wait_s=0.3, wake_keepalive_s=0.05)
    client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(model="z", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    with pytest.raises(openai.APIError, match="waking up"):
        async for _ in stream:
            pass
    await client.close()
    # Anthropic's SDK reads the same stream, comments and its error event, in Messages' shape.
    claude = anthropic.AsyncAnthropic(base_url=g.url, api_key="none", max_retries=0)
    events = await claude.messages.create(model="z", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                          stream=True)
    with pytest.raises(anthropic.APIStatusError, match="waking up") as raised:  # the body says its type
        async for _ in events:
            pass
    body: Any = raised.value.body
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "waking up" in body["error"]["message"]
    await claude.close()
    # Opted out: a plain 503 the client may retry on.
    status, plain, headers = await status_of(g, chat(stream=True), headers={"X-Nebula-Wake-Keepalive": "0"})
    assert status == 503 and plain["error"]["code"] == "model_waking" and headers["Retry-After"] == "1"


async def test_health_checks_scrapes_and_listings_do_not_count_as_requests(make_gateway: MakeGateway,
                                                                           engine: FakeEngine) -> None:
    g = await make_gateway()
    await put_instance(g.store, "m", engine.endpoint, model="m")
    await until(lambda: g.st.table.has_candidate("m"))
    for path in ("/healthz", "/metrics", "/v1/models", "/v1/models/m", "/v1/models/z", "/v1/admin/status",
                 "/v1/admin/models"):
        async with g.http.get(g.url + path) as resp:
            assert resp.status in (200, 503), path
    assert g.st.load.last_request == {} and g.st.load.inflight == {}
    status, _, _ = await status_of(g, chat("m"))
    assert status == 200 and set(g.st.load.last_request) == {"m"} and g.st.load.inflight["m"] == 0


async def test_admin_views_show_an_elastic_models_state(make_gateway: MakeGateway) -> None:
    g = await make_gateway()
    async with g.http.get(g.url + "/v1/admin/models") as resp:
        listed = {m["name"]: m for m in (await resp.json())["data"]}
    assert listed["z"]["state"] == "idle" and "state" not in listed["m"]
    await put_instance(g.store, "z:1", "http://127.0.0.1:1", phase=Phase.SLEEPING, model="z")
    await until(lambda: "sleeping" in g.st.table.phases().get("z", {}))
    assert (await models(g))["z"]["state"] == "sleeping"
    async with g.http.get(g.url + "/v1/admin/models/z") as resp:
        assert (await resp.json())["state"] == "sleeping"


async def test_an_upload_for_an_elastic_speech_model_is_held_too(make_gateway: MakeGateway,
                                                                 engine: FakeEngine) -> None:
    g = await make_gateway(wake_wait_s=30)
    speech = ModelSpec(name="w", source="org/w", task=Task.TRANSCRIBE, scaling=ELASTIC.scaling)
    await g.store.put(keys.model_key("w"), dumps(speech.to_dict()))
    await until(lambda: "w" in g.st.view.models)
    ctype, body = await encode([("model", "w", None), ("file", WAV, "clip.wav")])
    call = asyncio.create_task(g.http.post(g.url + "/v1/audio/transcriptions", data=body,
                                           headers={"Content-Type": ctype}))
    await until(lambda: g.st.load.held.get("w") == 1)
    await put_instance(g.store, "w:1", engine.endpoint, model="w", task=Task.TRANSCRIBE)
    async with await call as resp:
        assert resp.status == 200 and (await resp.json())["model"] == "w"
    assert g.st.load.inflight["w"] == 0 and g.st.load.last_request["w"] > 0


async def test_no_wake_is_asked_for_before_the_replica_table_knows_the_replicas() -> None:
    table, acct, asked, sent = ReplicaTable(), LoadAccounting(), [], []

    async def ask(wake: WakeRequest) -> bool:
        asked.append(wake)
        return True

    async def send(to: Any) -> None:
        sent.append(to)

    waker = Waker(GatewayConfig(wake_wait_s=5), table, acct, ask, WakeMetrics(CollectorRegistry()), "n1.1")
    held = asyncio.create_task(waker.serve("z", "/v1/chat/completions", False, {}, Recorder(), send))
    await until(lambda: acct.held.get("z") == 1)
    await asyncio.sleep(0.3)
    assert asked == [] and not held.done()
    ready = InstanceStatus(instance="z:1", model="z", node="n1", phase=Phase.READY, endpoint="http://127.0.0.1:1")
    table.update(MirrorState(records={keys.instance_key("z:1"): ready}))  # the first listing: it was awake
    await held
    assert asked == [] and len(sent) == 1 and acct.inflight["z"] == 0


async def test_with_no_room_to_hold_the_first_request_still_asks_for_the_wake(make_gateway: MakeGateway) -> None:
    g = await make_gateway(max_held_requests=0)
    for _ in range(3):
        status, body, _ = await status_of(g, chat())
        assert status == 503 and body["error"]["code"] == "model_waking"
    await until(lambda: g.metric("nebula_gateway_wakes_requested_total", {"model": "z"}) == 1)
    assert await g.wake_versions() == 1
