"""Chat and text completions through Nebula (gateway -> vLLM CPU engines), with the real `openai` client:
plain, streamed and with logprobs; tool calls and structured output; fields only vLLM knows; and the model list.
The cluster and the fixtures: openai_api_fixtures.py; embeddings, rerank and score: test_openai_embed_rerank.py;
errors: test_openai_errors.py. (test_messages_api.py takes SCHEMAS and check_args from here.)
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionNamedToolChoiceParam, ChatCompletionToolParam

from tests.integration.api_fixtures import CHAT_FAMILY, CHAT_MODEL, EMBED_MODEL, RERANK_MODEL
from tests.integration.openai_api_fixtures import (
    HELLO,
    client_fixture,  # noqa: F401 (the fixture client)
    gateway_fixture,  # noqa: F401 (the fixture gateway)
)

pytestmark = [pytest.mark.engine, pytest.mark.etcd]


# Enums and bounded integers only: a random model under a grammar then always finishes the object.
WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["paris", "tokyo", "lima"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": name, "description": f"{name} of a place", "parameters": params}}
    for name, params in SCHEMAS.items()
]
WEATHER_CHOICE: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}


# --- helpers ----------------------------------------------------------------------------------------


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def check_args(name: str, arguments: str) -> dict[str, Any]:
    """Tool-call arguments: valid JSON that matches the tool's schema (enums and bounds included)."""
    assert name in SCHEMAS, f"call to unknown tool {name!r}"
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{name} arguments are not JSON ({e}): {arguments!r}") from None
    assert isinstance(args, dict), f"{name} arguments are not an object: {arguments!r}"
    props = SCHEMAS[name]["properties"]
    assert set(args) == set(props), f"{name} arguments {args} do not have exactly the keys {sorted(props)}"
    for key, value in args.items():
        prop = props[key]
        if "enum" in prop:
            assert value in prop["enum"], f"{name}.{key}={value!r} not in {prop['enum']}"
        else:
            assert isinstance(value, int) and not isinstance(value, bool), f"{name}.{key}={value!r} not an int"
            assert prop["minimum"] <= value <= prop["maximum"], f"{name}.{key}={value} out of bounds"
    return args


# --- chat -------------------------------------------------------------------------------------------


def test_chat_non_stream(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=8)
    assert chat.model == CHAT_MODEL
    assert len(chat.choices) == 1
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content, f"no content: {chat}"
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8, f"usage: {chat.usage}"


def test_chat_stream_with_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content, "the stream carried no content"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, f"the last chunk is not the usage chunk: {last}"
    assert 0 < last.usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1]), "usage before the final chunk"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, logprobs=True,
                                          top_logprobs=3)
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content, f"no logprobs: {chat.choices[0]}"
    assert chat.usage is not None and len(logprobs.content) == chat.usage.completion_tokens
    for token in logprobs.content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3, f"expected 3 top logprobs: {token}"


# --- tools ------------------------------------------------------------------------------------------


def test_the_chat_model_was_loaded_with_no_flags_and_runs_with_its_familys(gateway: str) -> None:
    """The tool tests below pass only because the profile's flags reached `vllm serve`: the load sent none."""
    spec = get(gateway + f"/v1/admin/models/{CHAT_MODEL}")["spec"]
    assert spec["engine_args"] == [], spec
    assert spec["profile"]["family"] == CHAT_FAMILY and spec["profile"]["tool_call_parser"] == "pythonic", spec
    assert spec["profile"]["derived"]["family"], spec["profile"]["derived"]



def test_tool_choice_named_gives_a_schema_valid_call(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=100, tools=TOOLS,
                                          tool_choice=WEATHER_CHOICE)
    calls = chat.choices[0].message.tool_calls
    assert calls, f"no tool call for a named tool_choice: {chat.choices[0]}"
    for call in calls:
        assert call.type == "function"
        assert call.function.name == "get_weather", f"named get_weather, got {call.function.name}"
        check_args(call.function.name, call.function.arguments)


def test_tool_choice_required_gives_calls(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=300, tools=TOOLS,
                                          tool_choice="required", seed=1)
    choice = chat.choices[0]
    assert choice.message.tool_calls, f"no tool call for tool_choice=required: {choice}"
    assert choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason}"
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls), "duplicate ids"
    for call in choice.message.tool_calls:
        assert call.type == "function"
        check_args(call.function.name, call.function.arguments)


def test_tool_choice_auto_is_accepted(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=32, tools=TOOLS,
                                          tool_choice="auto", parallel_tool_calls=True)
    message = chat.choices[0].message
    assert message.content or message.tool_calls, f"neither content nor tool calls: {message}"
    for call in message.tool_calls or []:
        assert call.type == "function" and call.function.name in SCHEMAS


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    """The assistant's call (content null) and the tool's answer go back in; the engine accepts the history."""
    first = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=100, tools=TOOLS,
                                           tool_choice=WEATHER_CHOICE)
    calls = first.choices[0].message.tool_calls
    assert calls, f"no tool call: {first.choices[0]}"
    call = calls[0]
    assert call.type == "function"
    history: list[ChatCompletionMessageParam] = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})},
    ]
    second = client.chat.completions.create(model=CHAT_MODEL, messages=history, max_tokens=8, tools=TOOLS)
    assert second.choices[0].message.content or second.choices[0].message.tool_calls, second.choices[0]


def reassemble_tool_calls(chunks: Iterator[Any]) -> dict[int, dict[str, str]]:
    """Streamed tool-call deltas, joined by index: {index: {"id", "name", "arguments"}}."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or (delta.id or "")
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    return calls


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_streamed_tool_call_deltas_reassemble(client: openai.OpenAI, tool_choice: str) -> None:
    choice: Any = WEATHER_CHOICE if tool_choice == "named" else "required"
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=300, tools=TOOLS,
                                            tool_choice=choice, stream=True, seed=2)
    calls = reassemble_tool_calls(iter(stream))
    assert calls, f"no tool-call deltas in the stream (tool_choice={tool_choice})"
    for index, call in sorted(calls.items()):
        assert call["id"], f"call {index} has no id"
        if tool_choice == "named":
            assert call["name"] == "get_weather"
        check_args(call["name"], call["arguments"])


# --- structured output ------------------------------------------------------------------------------


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": WEATHER_PARAMS}},
    )
    content = chat.choices[0].message.content
    assert content, f"no content: {chat.choices[0]}"
    check_args("get_weather", content)


# --- unknown fields reach the engine ----------------------------------------------------------------


def test_unknown_fields_reach_the_engine(client: openai.OpenAI) -> None:
    """vLLM-only fields, none of which the gateway knows, each with an effect seen in the answer:
    allowed_token_ids + stop_token_ids + min_tokens shape the output, return_tokens_as_token_ids its logprobs."""
    allowed, stop = 101, 100
    extra = {"allowed_token_ids": [stop, allowed], "stop_token_ids": [stop], "return_tokens_as_token_ids": True}
    early = client.completions.create(model=CHAT_MODEL, prompt="def main", max_tokens=12, logprobs=1,
                                      extra_body=extra)
    held = client.completions.create(model=CHAT_MODEL, prompt="def main", max_tokens=12, logprobs=1,
                                     extra_body={**extra, "min_tokens": 6})
    for answer in (early, held):
        logprobs = answer.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens, f"no logprobs: {answer.choices[0]}"
        assert set(logprobs.tokens) <= {f"token_id:{allowed}", f"token_id:{stop}"}, (
            f"allowed_token_ids / return_tokens_as_token_ids not applied: {logprobs.tokens}")
    assert held.choices[0].logprobs is not None
    held_tokens = held.choices[0].logprobs.tokens or []
    assert held_tokens[:6] == [f"token_id:{allowed}"] * 6, f"min_tokens=6 not applied: {held_tokens}"


def test_chat_extra_body_return_token_ids(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=5,
                                          extra_body={"return_token_ids": True, "top_k": 5})
    token_ids = (chat.choices[0].model_extra or {}).get("token_ids")
    assert isinstance(token_ids, list) and len(token_ids) == 5, f"return_token_ids not applied: {chat.choices[0]}"


def test_negative_seed_reaches_the_engine(client: openai.OpenAI) -> None:
    """OpenAI and vLLM take any 64-bit seed; the gateway must not refuse one the engine accepts."""
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, seed=-1)
    assert chat.choices[0].message.content is not None


def test_n_choices(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, n=2)
    assert sorted(c.index for c in chat.choices) == [0, 1], chat.choices


# --- completions ------------------------------------------------------------------------------------


def test_completions_non_stream(client: openai.OpenAI) -> None:
    done = client.completions.create(model=CHAT_MODEL, prompt="def main():", max_tokens=8)
    assert done.model == CHAT_MODEL and done.object == "text_completion"
    assert done.choices[0].text, f"no text: {done}"
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 8


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=CHAT_MODEL, prompt="def main():", max_tokens=8, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and len([c for c in chunks if c.choices]) >= 2, f"not streamed: {chunks}"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


# --- models -----------------------------------------------------------------------------------------


def test_models_lists_the_three_with_nebula_fields(client: openai.OpenAI, gateway: str) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {CHAT_MODEL, EMBED_MODEL, RERANK_MODEL} <= ids, f"models listed: {ids}"
    entries = {m["id"]: m for m in get(gateway + "/v1/models")["data"]}
    for name, task in ((CHAT_MODEL, "generate"), (EMBED_MODEL, "embed"), (RERANK_MODEL, "rerank")):
        entry = entries[name]
        assert entry["object"] == "model"
        assert entry["task"] == task, f"{name}: task {entry['task']}"
        assert entry["replicas"] == 1 and entry["ready"] == 1, f"{name}: {entry}"
        assert entry["phases"] == {"ready": 1}, f"{name}: phases {entry['phases']}"
    single = client.models.retrieve(CHAT_MODEL)
    assert single.id == CHAT_MODEL
