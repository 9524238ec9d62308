"""Request validation of the OpenAI endpoints: pure functions that raise ValidationError(field, ...).

The gateway checks what it must know to route (the model) and what clients most often get wrong, so the
common mistakes get a clear 400 at the edge instead of a round trip to an engine. It does not try to be
the engine's full schema: the body is forwarded unchanged and the engine validates the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nebula.core.model import Task, expect_field
from nebula.errors import ValidationError
from nebula.services.gateway.messages_validation import check_count_tokens, check_messages

Body = Mapping[str, Any]


@dataclass(frozen=True)
class Endpoint:
    path: str  # after /v1/
    task: Task | None  # None: a model of any task (the tokenizer's endpoints)
    check: Callable[[Body], None]
    # The engine's path where it is not /v1/<path>; the gateway serves it under both spellings.
    engine_path: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """The gateway's paths for this endpoint."""
        return (f"/v1/{self.path}", self.engine_path) if self.engine_path else (f"/v1/{self.path}",)


def _number(body: Body, key: str, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> None:
    value = expect_field(body, key, (int, float), None)
    if value is None:
        return
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValidationError(key, f"must be {'greater than' if lo_open else 'at least'} {lo}")
    if hi is not None and value > hi:
        raise ValidationError(key, f"must be at most {hi}")


def _int(body: Body, key: str, lo: int) -> None:
    value = expect_field(body, key, int, None)
    if value is not None and value < lo:
        raise ValidationError(key, f"must be an integer >= {lo}")


def _str_or_str_list(body: Body, key: str, required: bool) -> None:
    value = expect_field(body, key, (str, list), ... if required else None)
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ValidationError(key, "must be a string or a list of strings")


def _prompt_like(body: Body, key: str) -> None:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids; not empty."""
    value = expect_field(body, key, (str, list))
    if isinstance(value, list):
        if not value:
            raise ValidationError(key, "must not be empty")
        ok = (all(isinstance(v, str) for v in value) or all(_is_token(v) for v in value)
              or all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value))
        if not ok:
            raise ValidationError(key, "must be a string, a list of strings, or (lists of) token ids")


def _is_token(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _sampling(body: Body) -> None:
    """Fields shared by chat and completions."""
    expect_field(body, "stream", bool, None)
    expect_field(body, "stream_options", dict, None)
    _int(body, "max_tokens", 1)
    _int(body, "max_completion_tokens", 1)
    _int(body, "n", 1)
    _int(body, "seed", -(2**63))  # any int64: vLLM takes negative seeds, OpenAI sets no lower bound
    _number(body, "temperature", lo=0)
    _number(body, "top_p", lo=0, hi=1, lo_open=True)
    _number(body, "presence_penalty", lo=-2, hi=2)
    _number(body, "frequency_penalty", lo=-2, hi=2)
    _str_or_str_list(body, "stop", required=False)


def check_chat(body: Body) -> None:
    messages = expect_field(body, "messages", list)
    if not messages:
        raise ValidationError("messages", "must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}]", "must be an object")
        if not isinstance(m.get("role"), str):
            raise ValidationError(f"messages[{i}].role", "is required and must be a string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValidationError(f"messages[{i}].content", "must be a string or a list of content parts")
    expect_field(body, "logprobs", bool, None)
    _int(body, "top_logprobs", 0)
    _sampling(body)


def check_completions(body: Body) -> None:
    _prompt_like(body, "prompt")
    _int(body, "logprobs", 0)
    expect_field(body, "echo", bool, None)
    _sampling(body)


def check_embeddings(body: Body) -> None:
    _prompt_like(body, "input")
    fmt = expect_field(body, "encoding_format", str, None)
    if fmt is not None and fmt not in ("float", "base64"):
        raise ValidationError("encoding_format", "must be 'float' or 'base64'")
    _int(body, "dimensions", 1)


def check_rerank(body: Body) -> None:
    # Engines also take multi-modal objects here, so objects pass through to them unchecked.
    query = expect_field(body, "query", (str, dict))
    if isinstance(query, str) and not query:
        raise ValidationError("query", "must not be empty")
    documents = expect_field(body, "documents", (list, dict))
    if isinstance(documents, list) and not documents:
        raise ValidationError("documents", "must not be empty")
    _int(body, "top_n", 0)
    expect_field(body, "return_documents", bool, None)


def check_score(body: Body) -> None:
    # vLLM's score API has named its two sides text_1/text_2 and, later, queries/documents.
    newer = "text_1" not in body and "queries" in body
    first, second = ("queries", "documents") if newer else ("text_1", "text_2")
    _str_or_str_list(body, first, required=True)
    _str_or_str_list(body, second, required=True)


def check_responses(body: Body) -> None:
    """The Responses API (POST /v1/responses): what routing and the common mistakes need; vLLM checks items."""
    expect_field(body, "input", (str, list))
    expect_field(body, "instructions", str, None)
    expect_field(body, "previous_response_id", str, None)
    for flag in ("stream", "store", "background"):
        expect_field(body, flag, bool, None)
    tools = expect_field(body, "tools", list, None)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValidationError("tools", "must be a list of tool objects")
    expect_field(body, "tool_choice", (str, dict), None)
    _int(body, "max_output_tokens", 1)
    _number(body, "temperature", lo=0)
    _number(body, "top_p", lo=0, hi=1, lo_open=True)


def check_tokenize(body: Body) -> None:
    """vLLM's /tokenize: a `prompt` string or chat `messages`."""
    if "messages" in body:
        expect_field(body, "messages", list)
    else:
        expect_field(body, "prompt", str)
    for flag in ("add_special_tokens", "return_token_strs", "add_generation_prompt"):
        expect_field(body, flag, bool, None)


def check_detokenize(body: Body) -> None:
    tokens = expect_field(body, "tokens", list)
    if not all(_is_token(t) for t in tokens):
        raise ValidationError("tokens", "must be a list of token ids (integers >= 0)")


ENDPOINTS: Mapping[str, Endpoint] = {e.path: e for e in (
    Endpoint("chat/completions", Task.GENERATE, check_chat),
    Endpoint("completions", Task.GENERATE, check_completions),
    Endpoint("embeddings", Task.EMBED, check_embeddings),
    Endpoint("rerank", Task.RERANK, check_rerank),
    Endpoint("score", Task.RERANK, check_score),
    # Anthropic's Messages API, which vLLM serves itself (errors in Anthropic's shape: services/http/errors.py).
    Endpoint("messages", Task.GENERATE, check_messages),
    Endpoint("messages/count_tokens", Task.GENERATE, check_count_tokens),
    Endpoint("responses", Task.GENERATE, check_responses),
    Endpoint("tokenize", None, check_tokenize, engine_path="/tokenize"),
    Endpoint("detokenize", None, check_detokenize, engine_path="/detokenize"),
)}


def check_request(endpoint: Endpoint, body: object) -> str:
    """Validate a parsed request body for `endpoint`; returns the model it names."""
    if not isinstance(body, dict):
        raise ValidationError("", "the request body must be a JSON object")
    model: str = expect_field(body, "model", str)
    if not model.strip():
        raise ValidationError("model", "must not be empty")
    endpoint.check(body)
    return model
