"""The routing policy's prefix key (pure): what a request's prompt prefix is keyed on, for chat, Anthropic
messages, Responses and completions requests (the pick it steers: test_routing_pick.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.routing import PREFIX_CHARS, prefix_key

# --- prefix_key ------------------------------------------------------------------------------------------

def chat(*messages: tuple[str, object], model: str = "m") -> dict[str, object]:
    return {"model": model, "messages": [{"role": r, "content": c} for r, c in messages]}


def test_prefix_key_is_short_hex_and_follows_the_conversation() -> None:
    first = chat(("system", "You are terse."), ("user", "Plan a trip"))
    key = prefix_key(first)
    assert key is not None and len(key) == 16 and int(key, 16) >= 0
    later = chat(("system", "You are terse."), ("user", "Plan a trip"), ("assistant", "Where?"),
                 ("user", "Rome"))
    assert prefix_key({**later, "temperature": 0.2, "stream": True}) == key
    assert prefix_key(chat(("system", "You are terse."), ("user", "Plan a party"))) != key
    assert prefix_key(chat(("system", "You are kind."), ("user", "Plan a trip"))) != key
    assert prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip"), model="other")) != key


def test_prefix_key_reads_content_parts_and_developer_role() -> None:
    parts = [{"type": "text", "text": "Plan "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "a trip"}]
    assert prefix_key(chat(("developer", "You are terse."), ("user", parts))) == prefix_key(
        chat(("system", "You are terse."), ("user", "Plan a trip")))


def test_prefix_key_of_anthropic_messages_reads_the_top_level_system_prompt() -> None:
    openai_style = prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip")))
    blocks = [{"type": "text", "text": "You are terse."}]
    for system in ("You are terse.", blocks):
        body = {**chat(("user", [{"type": "text", "text": "Plan a trip"}])), "system": system, "max_tokens": 8}
        assert prefix_key(body) == openai_style
    other = {**chat(("user", "Plan a trip")), "system": "You are kind."}
    assert prefix_key(other) != openai_style


def test_prefix_key_of_a_responses_request_reads_instructions_and_input() -> None:
    openai_style = prefix_key(chat(("system", "You are terse."), ("user", "Plan a trip")))
    assert prefix_key({"model": "m", "instructions": "You are terse.", "input": "Plan a trip"}) == openai_style
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Plan a trip"}]}]
    assert prefix_key({"model": "m", "instructions": "You are terse.", "input": items}) == openai_style
    assert prefix_key({"model": "m", "input": 3}) is None


def test_prefix_key_looks_at_a_bounded_prefix() -> None:
    head = "x" * PREFIX_CHARS
    assert prefix_key(chat(("user", head + "A"))) == prefix_key(chat(("user", head + "B")))
    assert prefix_key(chat(("user", head[1:] + "A"))) != prefix_key(chat(("user", head[1:] + "B")))


def test_prefix_key_of_completions() -> None:
    key = prefix_key({"model": "m", "prompt": "Once upon a time"})
    assert key is not None
    assert prefix_key({"model": "m", "prompt": ["Once upon a time", "other"]}) == key
    assert prefix_key({"model": "m", "prompt": "Once upon a tide"}) != key
    assert prefix_key({"model": "m", "prompt": [1, 2, 3]}) == prefix_key({"model": "m", "prompt": [[1, 2, 3]]})
    assert prefix_key({"model": "m", "prompt": [1, 2, 3]}) != prefix_key({"model": "m", "prompt": [1, 2, 4]})


@pytest.mark.parametrize("body", [
    {"model": "m", "input": ""},
    {"model": "m", "query": "q", "documents": ["a", "b"]},
    {"model": "m", "text_1": "a", "text_2": "b"},
    {"model": "m", "messages": []},
    {"model": "m", "prompt": ""},
    {"messages": [{"role": "user", "content": "hi"}]},
])
def test_prefix_key_is_none_without_a_text_prefix(body: dict[str, object]) -> None:
    assert prefix_key(body) is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=4),
                           max_leaves=20)


@given(st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input", "x"]), json_values))
def test_prefix_key_never_raises(body: dict[str, object]) -> None:
    key = prefix_key(body)
    assert key is None or len(key) == 16
