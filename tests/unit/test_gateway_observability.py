"""What the gateway tells operators about each request: request ids, TTFT / inter-token histograms, access
log lines with journal fields, and OpenTelemetry spans exported over OTLP/HTTP to a receiver.

MemoryStore -> gateway -> real aiohttp fake engines over loopback; the span exporter is OpenTelemetry's own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from nebula.adapters.memstore import MemoryStore
from nebula.core import keys
from nebula.core.config import GatewayConfig, TracingConfig
from nebula.core.model import ModelSpec, dumps
from nebula.services.gateway.app import build_gateway_app
from nebula.services.gateway.state import GATEWAY
from tests.harness.gateway_server import GatewayServer
from tests.harness.otlp import OtlpReceiver
from tests.unit.fake_engine import FakeEngine, engines, put_instance, sse_chunks, until

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT_STREAM = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@dataclass
class Gateway:
    server: GatewayServer
    registry: CollectorRegistry
    http: aiohttp.ClientSession

    def post(self, body: bytes, path: str = "/v1/chat/completions",
             headers: dict[str, str] | None = None) -> aiohttp.client._RequestContextManager:
        return self.http.post(str(self.server.make_url(path)), data=body,
                              headers={"Content-Type": "application/json", **(headers or {})})

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async for started in engines("a"):
        yield started[0]


@pytest.fixture
async def make_gateway(engine: FakeEngine) -> AsyncIterator[MakeGateway]:
    made: list[Gateway] = []

    async def make(tracing: TracingConfig | None = None, **cfg: Any) -> Gateway:
        store, registry = MemoryStore(), CollectorRegistry()
        await store.put(keys.model_key("m"), dumps(ModelSpec(name="m", source="/m").to_dict()))
        await put_instance(store, "m", engine.endpoint)
        app = build_gateway_app(GatewayConfig(**cfg), store, registry, tracing=tracing)
        server = GatewayServer(app)
        await server.start_server()
        gw = Gateway(server, registry, aiohttp.ClientSession())
        made.append(gw)
        await until(lambda: len(server.app[GATEWAY].table.ready().get("m", ())) == 1)
        return gw

    yield make
    for gw in made:
        await gw.http.close()
        await gw.server.close()


async def test_request_id_is_generated_returned_and_forwarded(make_gateway: MakeGateway,
                                                               engine: FakeEngine) -> None:
    gw = await make_gateway()
    async with gw.post(CHAT) as resp:
        assert resp.status == 200
        rid = resp.headers["X-Request-ID"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert engine.received[-1].headers["X-Request-ID"] == rid
    async with gw.post(CHAT) as resp:
        assert resp.headers["X-Request-ID"] != rid  # one per request


async def test_client_request_id_is_honoured_and_a_hostile_one_replaced(make_gateway: MakeGateway,
                                                                        engine: FakeEngine) -> None:
    gw = await make_gateway()
    async with gw.post(CHAT, headers={"x-request-id": "client-42"}) as resp:
        assert resp.headers["X-Request-ID"] == "client-42"
    assert engine.received[-1].headers.getall("X-Request-ID") == ["client-42"]  # once, not duplicated
    async with gw.post(CHAT, headers={"X-Request-ID": "x" * 500}) as resp:
        assert resp.status == 200
        assert len(resp.headers["X-Request-ID"]) == 32


async def test_errors_carry_the_request_id_too(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    body = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with gw.post(body, headers={"X-Request-ID": "r-404"}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Request-ID"] == "r-404"
        assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_ttft_and_inter_token_latency_are_observed_for_streams(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    labels = {"model": "m", "endpoint": "chat/completions"}
    async with gw.post(CHAT_STREAM) as resp:
        assert b"".join([c async for c in resp.content.iter_any()]) == b"".join(sse_chunks("a", "m"))
    assert gw.sample("nebula_gateway_ttft_seconds_count", labels) == 1
    assert gw.sample("nebula_gateway_inter_token_latency_seconds_count", labels) == 1
    # The fake engine sleeps 5 ms between events: the mean gap is at least that, and far below a second.
    itl = gw.sample("nebula_gateway_inter_token_latency_seconds_sum", labels)
    assert 0.004 <= itl < 1.0
    async with gw.post(CHAT) as resp:
        await resp.read()
    assert gw.sample("nebula_gateway_ttft_seconds_count", labels) == 2
    assert gw.sample("nebula_gateway_inter_token_latency_seconds_count", labels) == 1  # not a stream


async def test_access_log_lines_carry_journal_fields(make_gateway: MakeGateway,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(access_log="all")
    with caplog.at_level(logging.INFO, logger="nebula.services.gateway.openai_api"):
        async with gw.post(CHAT, headers={"X-Request-ID": "r-log"}) as resp:
            await resp.read()
    [record] = [r for r in caplog.records if getattr(r, "NEBULA_REQUEST_ID", None) == "r-log"]
    fields = vars(record)
    assert (fields["NEBULA_MODEL"], fields["NEBULA_INSTANCE"], fields["NEBULA_STATUS"]) == ("m", "m", 200)


async def test_access_log_errors_mode_is_quiet_on_success(make_gateway: MakeGateway, engine: FakeEngine,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway()  # the default: errors only
    with caplog.at_level(logging.INFO, logger="nebula.services.gateway.openai_api"):
        async with gw.post(CHAT) as resp:
            await resp.read()
        engine.status = 500
        async with gw.post(CHAT, headers={"X-Request-ID": "r-500"}) as resp:
            assert resp.status == 500
    ids = [getattr(r, "NEBULA_REQUEST_ID", None) for r in caplog.records]
    assert ids == ["r-500"]


async def test_spans_join_the_client_trace_and_parent_the_engine_call(make_gateway: MakeGateway,
                                                                      engine: FakeEngine) -> None:
    receiver = OtlpReceiver()
    endpoint = await receiver.start()
    try:
        gw = await make_gateway(tracing=TracingConfig(otlp_endpoint=endpoint))
        traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        async with gw.post(CHAT_STREAM, headers={"traceparent": traceparent, "X-Request-ID": "r-trace"}) as resp:
            await resp.read()
        await gw.server.close()  # app cleanup flushes the exporter
        [span] = receiver.spans_of(CLIENT_TRACE)
        assert span.service == "nebula-gateway" and span.name == "POST /v1/chat/completions"
        assert span.parent_span_id == CLIENT_SPAN
        assert span.attributes["nebula.request_id"] == "r-trace"
        assert span.attributes["nebula.replica"] == "m"
        assert span.attributes["http.response.status_code"] == "200"
        # The engine's spans will be children of the gateway's span, in the same trace.
        sent = engine.received[-1].headers.getall("traceparent")
        assert sent == [f"00-{CLIENT_TRACE}-{span.span_id}-01"]
    finally:
        await receiver.stop()


async def test_without_tracing_the_client_traceparent_reaches_the_engine_unchanged(
        make_gateway: MakeGateway, engine: FakeEngine) -> None:
    gw = await make_gateway()
    assert gw.server.app[GATEWAY].tracer is None
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    async with gw.post(CHAT, headers={"traceparent": traceparent}) as resp:
        await resp.read()
    assert engine.received[-1].headers["traceparent"] == traceparent
