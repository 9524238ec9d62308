"""Request checks of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): pure functions
that raise ValidationError(field, ...), answered in Anthropic's error shape (services/http/errors.py).

As for the OpenAI paths (validation.py), the gateway checks what it must know to route and what clients
most often get wrong; the body goes to the engine unchanged and vLLM's Messages API validates the rest
(vllm/entrypoints/anthropic/protocol.py is the schema it applies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nebula.core.model import expect_field, expect_number
from nebula.errors import ValidationError

Body = Mapping[str, Any]

# The roles vLLM's AnthropicMessage takes (Anthropic's own API takes user and assistant).
_ROLES = ("user", "assistant", "system")
_TOOL_CHOICES = ("auto", "any", "tool", "none")


def _blocks(value: Any, field: str) -> None:
    """A string, or a list of content blocks (objects with a string `type`)."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise ValidationError(field, "must be a string or a list of content blocks")
    for i, block in enumerate(value):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ValidationError(f"{field}[{i}]", "must be a content block: an object with a string 'type'")


def _messages(body: Body) -> None:
    messages = expect_field(body, "messages", list)
    if not messages:
        raise ValidationError("messages", "must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}]", "must be an object")
        if m.get("role") not in _ROLES:
            raise ValidationError(f"messages[{i}].role", "must be 'user' or 'assistant'")
        if "content" not in m:
            raise ValidationError(f"messages[{i}].content", "is required")
        _blocks(m["content"], f"messages[{i}].content")
    system = body.get("system")
    if system is not None:
        _blocks(system, "system")


def _tools(body: Body) -> None:
    tools = expect_field(body, "tools", list, None)
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise ValidationError(f"tools[{i}]", "must be an object")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ValidationError(f"tools[{i}].name", "is required and must be a non-empty string")
        # Anthropic's server tools (web search, bash...) have a `type` and no input_schema.
        if "type" not in tool and not isinstance(tool.get("input_schema"), dict):
            raise ValidationError(f"tools[{i}].input_schema", "is required and must be a JSON schema object")
    choice = expect_field(body, "tool_choice", dict, None)
    if choice is not None:
        if choice.get("type") not in _TOOL_CHOICES:
            raise ValidationError("tool_choice.type", f"must be one of {', '.join(_TOOL_CHOICES)}")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            raise ValidationError("tool_choice.name", "is required when tool_choice.type is 'tool'")


def _number(body: Body, key: str, lo: float, hi: float | None = None) -> None:
    value = expect_number(body, key, None) if body.get(key) is not None else None
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bounds = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise ValidationError(key, f"must be {bounds}")


def check_messages(body: Body) -> None:
    max_tokens = expect_field(body, "max_tokens", int)
    if max_tokens < 1:
        raise ValidationError("max_tokens", "must be an integer >= 1")
    _messages(body)
    _tools(body)
    expect_field(body, "stream", bool, None)
    # vLLM passes temperature on to its sampler, which takes up to 2 (Anthropic's own API stops at 1).
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    top_k = expect_field(body, "top_k", int, None)
    if top_k is not None and top_k < -1:
        raise ValidationError("top_k", "must be an integer >= 1 (or -1 for no limit)")
    stop = expect_field(body, "stop_sequences", list, None)
    if stop is not None and not all(isinstance(s, str) for s in stop):
        raise ValidationError("stop_sequences", "must be a list of strings")
    expect_field(body, "metadata", dict, None)


def check_count_tokens(body: Body) -> None:
    _messages(body)
    _tools(body)
