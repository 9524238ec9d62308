"""One request, followed across processes on the shared real-vLLM cluster: its X-Request-ID becomes vLLM's
own request id, and its W3C trace gets a span from the gateway and spans from the engine, exported over
OTLP/HTTP to the receiver the session fixture started (the cluster runs with [tracing] otlp_endpoint)."""

from __future__ import annotations

import secrets
import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.api_fixtures import CHAT_MODEL, ApiCluster

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def test_request_id_reaches_vllm_and_comes_back(api_cluster: ApiCluster) -> None:
    client = openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=HELLO, max_tokens=4,
        extra_headers={"X-Request-ID": "it-req-7"})
    assert raw.headers["x-request-id"] == "it-req-7"
    assert raw.parse().id == "chatcmpl-it-req-7"  # vLLM named its request after ours


def test_a_request_is_one_trace_across_gateway_and_engine(api_cluster: ApiCluster) -> None:
    client = openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0)
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, max_tokens=4, stream=True,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert any(chunk.choices for chunk in stream)
    # Both sides export in batches (every 5 s by default).
    deadline = time.monotonic() + 30
    while True:
        spans = api_cluster.traces.spans_of(trace_id)
        gateway = [s for s in spans if s.service == "nebula-gateway"]
        engine = [s for s in spans if s.service != "nebula-gateway"]
        if gateway and engine:
            break
        assert time.monotonic() < deadline, f"spans of the trace after 30 s: {spans}"
        time.sleep(0.5)
    [gw] = gateway
    assert gw.parent_span_id == client_span and gw.attributes["nebula.model"] == CHAT_MODEL
    assert any(s.parent_span_id == gw.span_id for s in engine), f"no engine span under the gateway's: {engine}"
