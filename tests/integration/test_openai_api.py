"""The full OpenAI API through Nebula (gateway -> vLLM CPU engines), with the real `openai` client.

One session-wide cluster serves three models (see api_fixtures.py): `chat` (tiny-llama, a random model
whose tool calls and JSON are forced by structured outputs), `embed` (tiny BERT, 64 dimensions) and
`rerank` (tiny BERT cross-encoder). A random model never emits EOS on its own: every request sets max_tokens.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)

from tests.harness.cluster import post_json
from tests.integration.api_fixtures import (
    CHAT_FAMILY,
    CHAT_MODEL,
    EMBED_MODEL,
    MAX_MODEL_LEN,
    RERANK_MODEL,
    ApiCluster,
)

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

EMBED_DIM = 64
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather like?"}]

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


@pytest.fixture(scope="module")
def client(api_cluster: ApiCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(api_cluster: ApiCluster) -> str:
    return api_cluster.gateway_url


# --- helpers ----------------------------------------------------------------------------------------


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def assert_error_shape(status: int, body: Mapping[str, Any], expected_status: int) -> dict[str, Any]:
    """The OpenAI error shape `{"error": {"message", "type", "param", "code"}}` with the expected status."""
    assert status == expected_status, f"expected {expected_status}, got {status}: {body}"
    assert set(body) == {"error"}, f"not the OpenAI error shape: {body}"
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), f"error lacks OpenAI fields: {error}"
    assert isinstance(error["message"], str) and error["message"], f"empty error message: {error}"
    assert isinstance(error["type"], str) and error["type"], f"empty error type: {error}"
    return error


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


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def decode_base64_floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    assert len(raw) % 4 == 0, f"base64 embedding of {len(raw)} bytes is not float32s"
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


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


# --- embeddings -------------------------------------------------------------------------------------


def test_embeddings_float(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "def main(): pass"],
                                   encoding_format="float")
    assert out.model == EMBED_MODEL
    assert [d.index for d in out.data] == [0, 1]
    for d in out.data:
        assert len(d.embedding) == EMBED_DIM, f"dimension {len(d.embedding)}"
        assert abs(norm(d.embedding) - 1.0) < 1e-3, f"not unit norm: {norm(d.embedding)}"
    assert out.data[0].embedding != out.data[1].embedding
    assert out.usage.prompt_tokens > 0


def test_embeddings_base64_matches_float(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    encoded = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="base64")
    raw: Any = encoded.data[0].embedding  # the client leaves an explicit base64 answer as the string
    assert isinstance(raw, str), f"expected a base64 string, got {type(raw).__name__}"
    decoded = decode_base64_floats(raw)
    assert len(decoded) == EMBED_DIM
    diff = max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding, strict=True))
    assert diff < 1e-5, f"base64 and float embeddings differ by {diff}"


def test_embeddings_of_token_ids(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=EMBED_MODEL, input=[[5, 6, 7], [8, 9]], encoding_format="float")
    assert [len(d.embedding) for d in out.data] == [EMBED_DIM, EMBED_DIM]


def test_embeddings_client_default_encoding(client: openai.OpenAI) -> None:
    """The openai client asks for base64 by default and decodes it itself."""
    default = client.embeddings.create(model=EMBED_MODEL, input="hello world")
    floats = client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    assert len(default.data[0].embedding) == EMBED_DIM
    diff = max(abs(a - b) for a, b in zip(default.data[0].embedding, floats.data[0].embedding, strict=True))
    assert diff < 1e-5, f"decoded default embedding differs from float by {diff}"


# --- rerank and score -------------------------------------------------------------------------------

DOCUMENTS = ["def add(a, b): return a + b", "the cat sat on the mat", "import os", "class Stack: pass"]


def rerank(gateway: str, **fields: Any) -> dict[str, Any]:
    status, body = post_json(gateway + "/v1/rerank", {"model": RERANK_MODEL, "query": "a python function",
                                                 "documents": DOCUMENTS, **fields})
    assert status == 200, f"rerank -> {status}: {body}"
    return body


def assert_sorted_results(results: list[dict[str, Any]]) -> None:
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True), f"results not sorted by relevance: {scores}"
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < len(DOCUMENTS) for i in indices), indices


def test_rerank_all_documents_sorted(gateway: str) -> None:
    body = rerank(gateway)
    assert body["model"] == RERANK_MODEL
    assert len(body["results"]) == len(DOCUMENTS)
    assert_sorted_results(body["results"])


def test_rerank_top_n_and_documents(gateway: str) -> None:
    body = rerank(gateway, top_n=2, return_documents=True)
    results = body["results"]
    assert len(results) == 2, f"top_n=2 not honoured: {results}"
    assert_sorted_results(results)
    best = rerank(gateway)["results"][:2]
    assert [r["index"] for r in results] == [r["index"] for r in best], "top_n did not keep the best two"
    for r in results:
        assert r["document"]["text"] == DOCUMENTS[r["index"]], f"document not returned: {r}"


def test_rerank_return_documents_false_omits_documents(gateway: str) -> None:
    """Cohere's shape: with return_documents=false a result is only index and relevance_score."""
    results = rerank(gateway, top_n=2, return_documents=False)["results"]
    assert len(results) == 2
    for r in results:
        assert not (r.get("document") or {}).get("text"), f"document returned although not asked for: {r}"


@pytest.mark.parametrize("sides", [("text_1", "text_2"), ("queries", "documents")])
def test_score(gateway: str, sides: tuple[str, str]) -> None:
    first, second = sides
    status, body = post_json(gateway + "/v1/score", {"model": RERANK_MODEL, first: "a python function",
                                                second: DOCUMENTS[:2]})
    assert status == 200, f"score -> {status}: {body}"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(isinstance(d["score"], float) for d in body["data"]), body
    by_index = {r["index"]: r["relevance_score"] for r in rerank(gateway)["results"]}
    for d in body["data"]:
        assert abs(d["score"] - by_index[d["index"]]) < 1e-4, "score and rerank disagree on the same pair"


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


# --- the wrong endpoint for a model's task: a clear 400 from the gateway -----------------------------

WRONG_TASK: list[tuple[str, str, dict[str, Any]]] = [
    ("chat/completions", EMBED_MODEL, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("completions", RERANK_MODEL, {"prompt": "hi", "max_tokens": 4}),
    ("embeddings", CHAT_MODEL, {"input": "hi"}),
    ("rerank", CHAT_MODEL, {"query": "q", "documents": ["d"]}),
    ("score", EMBED_MODEL, {"text_1": "q", "text_2": ["d"]}),
]


@pytest.mark.parametrize(("path", "model", "fields"), WRONG_TASK, ids=[f"{p}->{m}" for p, m, _ in WRONG_TASK])
def test_endpoint_the_model_does_not_serve(gateway: str, path: str, model: str, fields: dict[str, Any]) -> None:
    status, body = post_json(f"{gateway}/v1/{path}", {"model": model, **fields})
    error = assert_error_shape(status, body, 400)
    assert error["code"] == "model_not_supported" and error["param"] == "model", error
    assert f"/v1/{path}" in error["message"] and model in error["message"], error["message"]


def test_wrong_task_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=EMBED_MODEL, messages=HELLO, max_tokens=4)
    assert exc.value.status_code == 400 and "task" in exc.value.message


# --- upstream engine errors pass through ------------------------------------------------------------


def test_engine_error_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=MAX_MODEL_LEN * 100)
    assert exc.value.status_code == 400
    assert "max_model_len" in exc.value.message and str(MAX_MODEL_LEN * 100) in exc.value.message, (
        f"not vLLM's own message: {exc.value.message}")


def test_engine_error_passes_through_on_a_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=MAX_MODEL_LEN * 100,
                                       stream=True)
    assert exc.value.status_code == 400 and "max_model_len" in exc.value.message, exc.value.message


def test_engine_validation_of_an_unknown_field_passes_through(gateway: str) -> None:
    status, body = post_json(gateway + "/v1/chat/completions", {"model": CHAT_MODEL, "messages": HELLO,
                                                           "max_tokens": 5, "min_tokens": 10})
    error = assert_error_shape(status, body, 400)
    assert "min_tokens must be less than or equal to" in error["message"], error


# --- bad input: the OpenAI error shape, the right 4xx -----------------------------------------------

CHAT_OK: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_INPUT: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed-json", b'{"model": "chat", "messages": [', 400, None),
    ("not-an-object", b"[1, 2]", 400, None),
    ("not-utf8", b"\xff\xfe", 400, None),
    ("deeply-nested-json", b"[" * 100_000, 400, None),
    ("missing-model", {k: v for k, v in CHAT_OK.items() if k != "model"}, 400, "model"),
    ("missing-messages", {"model": CHAT_MODEL, "max_tokens": 4}, 400, "messages"),
    ("messages-wrong-type", {**CHAT_OK, "messages": "hi"}, 400, "messages"),
    ("negative-max-tokens", {**CHAT_OK, "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-string", {**CHAT_OK, "max_tokens": "4"}, 400, "max_tokens"),
    ("unknown-model", {**CHAT_OK, "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input(gateway: str, body: bytes | dict[str, Any], status: int, param: str | None) -> None:
    got, answer = post_json(gateway + "/v1/chat/completions", body)
    error = assert_error_shape(got, answer, status)
    if param is not None:
        assert error["param"] == param, f"param {error['param']!r}, expected {param!r}: {error}"


def replica_picks(gateway_url: str) -> float:
    """Total replica picks the gateway made (one per request it forwarded to an engine)."""
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nebula_gateway_picks_total"))


def test_rejected_requests_never_reach_an_engine(api_cluster: ApiCluster) -> None:
    gateway = api_cluster.gateway_url
    before = replica_picks(gateway)
    for what, body, _, _ in BAD_INPUT:  # their statuses are test_bad_input's concern
        assert post_json(gateway + "/v1/chat/completions", body)[0] >= 400, f"{what} was accepted"
    for path, model, fields in WRONG_TASK:
        assert post_json(f"{gateway}/v1/{path}", {"model": model, **fields})[0] >= 400, f"{path} -> {model} accepted"
    assert replica_picks(gateway) == before, "a rejected request was forwarded to an engine"
    client_ok = post_json(gateway + "/v1/chat/completions", CHAT_OK)
    assert client_ok[0] == 200
    assert replica_picks(gateway) == before + 1, "the picks metric does not count picks"


def test_unknown_path_and_wrong_method(gateway: str) -> None:
    status, body = post_json(gateway + "/v1/no-such-endpoint", CHAT_OK)
    assert_error_shape(status, body, 404)
    try:
        urllib.request.urlopen(gateway + "/v1/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert_error_shape(e.code, json.loads(e.read()), 405)
    else:
        raise AssertionError("GET /v1/chat/completions was answered")


def test_oversized_body_is_413(gateway: str) -> None:
    big = {**CHAT_OK, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    status, body = post_json(gateway + "/v1/chat/completions", big)
    error = assert_error_shape(status, body, 413)
    assert error["code"] == "request_too_large", error


def test_unknown_model_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="no-such-model", input="hi")
    assert exc.value.status_code == 404 and "no-such-model" in exc.value.message
