"""Request rules of Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), as tables
(request_rules.py) that both check a body and render its schema in GET /openapi.json; a failed check raises
ValidationError(field, ...), answered in Anthropic's error shape (services/http/errors.py).

As for the OpenAI paths (validation.py), the gateway checks what it must know to route and what clients
most often get wrong; the body goes to the engine unchanged and vLLM's Messages API validates the rest
(vllm/entrypoints/anthropic/protocol.py is the schema it applies).
"""

from __future__ import annotations

from typing import Any

from nebula.errors import ValidationError
from nebula.services.gateway.request_rules import STRINGS, Body, Custom, Field, Item, check_body, opt, rules

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


BLOCKS = Custom(_blocks, {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}}]})


def _message(m: object, name: str) -> None:
    if not isinstance(m, dict):
        raise ValidationError(name, "must be an object")
    if m.get("role") not in _ROLES:
        raise ValidationError(f"{name}.role", "must be 'user' or 'assistant'")
    if "content" not in m:
        raise ValidationError(f"{name}.content", "is required")
    _blocks(m["content"], f"{name}.content")


MESSAGE = Item({"type": "object", "required": ["role", "content"], "additionalProperties": True,
                "properties": {"role": {"enum": list(_ROLES)}, "content": BLOCKS.schema}}, check=_message)


def _tool(tool: object, name: str) -> None:
    if not isinstance(tool, dict):
        raise ValidationError(name, "must be an object")
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise ValidationError(f"{name}.name", "is required and must be a non-empty string")
    # Anthropic's server tools (web search, bash...) have a `type` and no input_schema.
    if "type" not in tool and not isinstance(tool.get("input_schema"), dict):
        raise ValidationError(f"{name}.input_schema", "is required and must be a JSON schema object")


TOOL = Item({"type": "object", "required": ["name"], "additionalProperties": True,
             "anyOf": [{"required": ["input_schema"]}, {"required": ["type"]}],
             "properties": {"name": {"type": "string", "minLength": 1}, "description": opt({"type": "string"}),
                            "input_schema": {"type": "object"}}}, check=_tool)


def _tool_choice(choice: dict[str, Any], _: str) -> None:
    if choice.get("type") not in _TOOL_CHOICES:
        raise ValidationError("tool_choice.type", f"must be one of {', '.join(_TOOL_CHOICES)}")
    if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise ValidationError("tool_choice.name", "is required when tool_choice.type is 'tool'")


TOOL_CHOICE = Custom(_tool_choice, {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": list(_TOOL_CHOICES)}, "name": {"type": "string"}},
    "anyOf": [{"properties": {"type": {"enum": [c for c in _TOOL_CHOICES if c != "tool"]}}}, {"required": ["name"]}]})

_COMMON = (Field("messages", (list,), required=True, non_empty=True, items=MESSAGE),
           Field("system", (), custom=BLOCKS),
           Field("tools", (list,), items=TOOL), Field("tool_choice", (dict,), custom=TOOL_CHOICE))

MESSAGES_RULES = rules(
    Field("max_tokens", (int,), required=True, minimum=1), *_COMMON, Field("stream", (bool,)),
    # vLLM passes temperature on to its sampler, which takes up to 2 (Anthropic's own API stops at 1).
    Field("temperature", (int, float), minimum=0, maximum=2, finite=True, message="must be between 0 and 2"),
    Field("top_p", (int, float), minimum=0, maximum=1, finite=True, message="must be between 0 and 1"),
    Field("top_k", (int,), minimum=-1, message="must be an integer >= 1 (or -1 for no limit)"),
    Field("stop_sequences", (list,), items=STRINGS, message="must be a list of strings"),
    Field("metadata", (dict,)))

COUNT_TOKENS_RULES = rules(*_COMMON)


def check_messages(body: Body) -> None:
    check_body(MESSAGES_RULES, body)


def check_count_tokens(body: Body) -> None:
    check_body(COUNT_TOKENS_RULES, body)
