"""Anthropic's Messages API through Nebula (gateway -> vLLM CPU engine) with the real `anthropic` SDK.

The shared cluster's `chat` model (api_fixtures.py: tiny-llama, whose tool calls are forced by structured
outputs) answers; a random model never stops by itself, so every request sets max_tokens. The gateway relays
vLLM's own Messages API: these tests prove it routes, streams Anthropic's SSE events unchanged, forces tool
calls, counts tokens and answers errors in Anthropic's shape.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from tests.integration.api_fixtures import CHAT_MODEL, EMBED_MODEL, ApiCluster
from tests.integration.test_openai_api import SCHEMAS, check_args

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

HELLO: list[MessageParam] = [{"role": "user", "content": "What is the weather like?"}]
TOOLS: list[ToolParam] = [{"name": name, "description": f"{name} of a place", "input_schema": schema}
                          for name, schema in SCHEMAS.items()]
# The SSE event types of a streamed message, in Anthropic's order (its streaming documentation).
OPENING = ["message_start", "content_block_start"]
CLOSING = ["content_block_stop", "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def client(api_cluster: ApiCluster) -> anthropic.Anthropic:
    # The gateway is open in this cluster: the key is sent (in x-api-key, as the SDK does) and ignored.
    return anthropic.Anthropic(base_url=api_cluster.gateway_url, api_key="unused", max_retries=0, timeout=120)


def _requests_counted(gateway: str, endpoint: str) -> float:
    with urllib.request.urlopen(gateway + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nebula_gateway_requests_total{") and f'endpoint="{endpoint}"' in line \
                and f'model="{CHAT_MODEL}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_message_with_a_system_prompt(client: anthropic.Anthropic, api_cluster: ApiCluster) -> None:
    before = _requests_counted(api_cluster.gateway_url, "messages")
    message = client.messages.create(model=CHAT_MODEL, max_tokens=8, system="Answer in one word.",
                                     messages=HELLO)
    assert message.type == "message" and message.role == "assistant"
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "max_tokens"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 8
    assert _requests_counted(api_cluster.gateway_url, "messages") == before + 1


def test_streamed_message_has_anthropics_event_sequence(client: anthropic.Anthropic) -> None:
    types: list[str] = []
    text = ""
    with client.messages.stream(model=CHAT_MODEL, max_tokens=8, messages=HELLO) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
        final = stream.get_final_message()
    # The SDK adds its own derived events (text, ...) beside the wire's; the wire's keep their order.
    wire = [t for t in types if t in {*OPENING, *CLOSING, "content_block_delta"}]
    assert wire[:2] == OPENING and wire[-3:] == CLOSING, types
    assert "content_block_delta" in wire
    assert final.content[0].type == "text" and final.content[0].text == text and text


def test_forced_tool_call_gives_a_schema_valid_tool_use(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=CHAT_MODEL, max_tokens=64, messages=HELLO, tools=TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"})
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses, message
    assert uses[0].name == "get_weather" and uses[0].id
    check_args("get_weather", json.dumps(uses[0].input))
    assert message.stop_reason == "tool_use"


def test_streamed_forced_tool_call(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=CHAT_MODEL, max_tokens=64, messages=HELLO, tools=TOOLS,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    uses = [block for block in final.content if block.type == "tool_use"]
    assert uses, final
    check_args(uses[0].name, json.dumps(uses[0].input))


def test_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    messages: list[MessageParam] = [
        *HELLO,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "paris", "days": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]},
    ]
    message = client.messages.create(model=CHAT_MODEL, max_tokens=8, messages=messages, tools=TOOLS)
    assert message.content and message.usage.input_tokens > 0


def test_count_tokens_grows_with_the_prompt(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=CHAT_MODEL, messages=HELLO)
    longer = client.messages.count_tokens(model=CHAT_MODEL, system="Be brief and exact in every answer.",
                                          messages=HELLO)
    assert 0 < short.input_tokens < longer.input_tokens


def test_errors_reach_the_sdk_as_its_exceptions(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    body: Any = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
    with pytest.raises(anthropic.BadRequestError) as task:
        client.messages.create(model=EMBED_MODEL, max_tokens=8, messages=HELLO)
    assert "embed" in str(task.value)


def test_an_engine_error_passes_through_in_anthropics_shape(client: anthropic.Anthropic) -> None:
    # Past the model's context (max_model_len 512): vLLM itself refuses, in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model=CHAT_MODEL, max_tokens=100_000, messages=HELLO)
    body: Any = too_long.value.body
    assert body["type"] == "error" and body["error"]["message"], body
