"""Request rules of the OpenAI endpoints, as tables (request_rules.py) that both check a body and render its
schema in GET /openapi.json; each check raises ValidationError(field, ...).

The gateway checks what it must know to route (the model) and what clients most often get wrong, so the
common mistakes get a clear 400 at the edge instead of a round trip to an engine. It does not try to be
the engine's full schema: the body is forwarded unchanged and the engine validates the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from nebula.core.model import Task
from nebula.errors import ValidationError
from nebula.services.gateway.messages_validation import COUNT_TOKENS_RULES, MESSAGES_RULES
from nebula.services.gateway.request_rules import (
    OBJECTS,
    STRINGS,
    TOKEN_SCHEMA,
    TOKENS,
    Body,
    Custom,
    Field,
    Item,
    Rules,
    Shape,
    check_body,
    check_model,
    is_token,
    opt,
    rules,
)


@dataclass(frozen=True)
class Endpoint:
    path: str  # after /v1/
    task: Task | None  # None: a model of any task (the tokenizer's endpoints)
    rules: Rules
    # The engine's path where it is not /v1/<path>; the gateway serves it under both spellings.
    engine_path: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """The gateway's paths for this endpoint."""
        return (f"/v1/{self.path}", self.engine_path) if self.engine_path else (f"/v1/{self.path}",)

    def check(self, body: Body) -> None:
        check_body(self.rules, body)


def _prompt(value: Any, name: str) -> None:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids; not empty."""
    if isinstance(value, list):
        if not value:
            raise ValidationError(name, "must not be empty")
        ok = (all(isinstance(v, str) for v in value) or all(is_token(v) for v in value)
              or all(isinstance(v, list) and v and all(is_token(t) for t in v) for v in value))
        if not ok:
            raise ValidationError(name, "must be a string, a list of strings, or (lists of) token ids")


PROMPT = Custom(_prompt, {"anyOf": [
    {"type": "string"},
    {"type": "array", "minItems": 1, "items": {"type": "string"}},
    {"type": "array", "minItems": 1, "items": TOKEN_SCHEMA},
    {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": TOKEN_SCHEMA}},
]})


def _chat_message(m: object, name: str) -> None:
    if not isinstance(m, dict):
        raise ValidationError(name, "must be an object")
    if not isinstance(m.get("role"), str):
        raise ValidationError(f"{name}.role", "is required and must be a string")
    content = m.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise ValidationError(f"{name}.content", "must be a string or a list of content parts")


CHAT_MESSAGE = Item({"type": "object", "required": ["role"], "additionalProperties": True,
                     "properties": {"role": {"type": "string"},
                                    "content": opt({"anyOf": [{"type": "string"}, {"type": "array"}]})}},
                    check=_chat_message)


def _flag(name: str) -> Field:
    return Field(name, (bool,))


def _count(name: str, minimum: int) -> Field:
    return Field(name, (int,), minimum=minimum)


_STRS: Final = "must be a string or a list of strings"
_TEMPERATURE = Field("temperature", (int, float), minimum=0)
_TOP_P = Field("top_p", (int, float), minimum=0, maximum=1, exclusive_minimum=True)

# Fields shared by chat and completions.
_SAMPLING = (
    _flag("stream"), Field("stream_options", (dict,)),
    _count("max_tokens", 1), _count("max_completion_tokens", 1), _count("n", 1),
    _count("seed", -(2**63)),  # any int64: vLLM takes negative seeds, OpenAI sets no lower bound
    _TEMPERATURE, _TOP_P,
    Field("presence_penalty", (int, float), minimum=-2, maximum=2),
    Field("frequency_penalty", (int, float), minimum=-2, maximum=2),
    Field("stop", (str, list), items=STRINGS, message=_STRS),
)

CHAT = rules(Field("messages", (list,), required=True, non_empty=True, items=CHAT_MESSAGE),
             _flag("logprobs"), _count("top_logprobs", 0), *_SAMPLING)

COMPLETIONS = rules(Field("prompt", (str, list), required=True, custom=PROMPT), _count("logprobs", 0),
                    _flag("echo"), *_SAMPLING)

EMBEDDINGS = rules(Field("input", (str, list), required=True, custom=PROMPT),
                   Field("encoding_format", (str,), enum=("float", "base64")), _count("dimensions", 1))

# Engines also take multi-modal objects here, so objects pass through to them unchecked.
RERANK = rules(Field("query", (str, dict), required=True, non_empty=True),
               Field("documents", (list, dict), required=True, non_empty=True),
               _count("top_n", 0), _flag("return_documents"))


def _score_shape(first: str, second: str, unless: str = "") -> Shape:
    return Shape((Field(first, (str, list), required=True, items=STRINGS, message=_STRS),
                  Field(second, (str, list), required=True, items=STRINGS, message=_STRS)), unless)


# vLLM's score API has named its two sides text_1/text_2 and, later, queries/documents.
SCORE = Rules((_score_shape("text_1", "text_2"), _score_shape("queries", "documents", unless="text_1")),
              pick=lambda body: 1 if "text_1" not in body and "queries" in body else 0, combine="oneOf")

# The Responses API (POST /v1/responses): what routing and the common mistakes need; vLLM checks items.
RESPONSES = rules(
    Field("input", (str, list), required=True), Field("instructions", (str,)),
    Field("previous_response_id", (str,)), _flag("stream"), _flag("store"), _flag("background"),
    Field("tools", (list,), items=OBJECTS, message="must be a list of tool objects"),
    Field("tool_choice", (str, dict)), _count("max_output_tokens", 1), _TEMPERATURE, _TOP_P)

# vLLM's /tokenize: a `prompt` string or chat `messages`.
_TOKENIZE_FLAGS = (_flag("add_special_tokens"), _flag("return_token_strs"), _flag("add_generation_prompt"))
TOKENIZE = Rules((Shape((Field("prompt", (str,), required=True), *_TOKENIZE_FLAGS)),
                  Shape((Field("messages", (list,), required=True), *_TOKENIZE_FLAGS))),
                 pick=lambda body: 1 if "messages" in body else 0)

DETOKENIZE = rules(Field("tokens", (list,), required=True, items=TOKENS,
                         message="must be a list of token ids (integers >= 0)"))

ENDPOINTS: Mapping[str, Endpoint] = {e.path: e for e in (
    Endpoint("chat/completions", Task.GENERATE, CHAT),
    Endpoint("completions", Task.GENERATE, COMPLETIONS),
    Endpoint("embeddings", Task.EMBED, EMBEDDINGS),
    Endpoint("rerank", Task.RERANK, RERANK),
    Endpoint("score", Task.RERANK, SCORE),
    # Anthropic's Messages API, which vLLM serves itself (errors in Anthropic's shape: services/http/errors.py).
    Endpoint("messages", Task.GENERATE, MESSAGES_RULES),
    Endpoint("messages/count_tokens", Task.GENERATE, COUNT_TOKENS_RULES),
    Endpoint("responses", Task.GENERATE, RESPONSES),
    Endpoint("tokenize", None, TOKENIZE, engine_path="/tokenize"),
    Endpoint("detokenize", None, DETOKENIZE, engine_path="/detokenize"),
)}


def parse_body(raw: bytes) -> object:
    """An inference request's JSON body. orjson, not json.loads: the gateway parses every request's body, and a
    chat body costs 0.9 us instead of 3.4 at 2 KB, 70 instead of 164 at 200 KB (an agent's long context).
    It reads JSON as RFC 8259 has it (UTF-8; no NaN or Infinity, which json.loads takes), and an integer
    beyond 64 bits as a float, which the rules then refuse where they want an integer."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValidationError("", f"not valid JSON: {e}") from None


def check_request(endpoint: Endpoint, body: object) -> str:
    """Validate a parsed request body for `endpoint`; returns the model it names."""
    if not isinstance(body, dict):
        raise ValidationError("", "the request body must be a JSON object")
    model = check_model(body)
    endpoint.check(body)
    return model
