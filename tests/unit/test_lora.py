"""LoRA adapters, the pure part (core/lora.py): records, the engine flags, the checks at add time, the plan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.core.config import EngineConfig
from nebula.core.engine_spec import EngineSpec, vllm_command
from nebula.core.lora import (
    DEFAULT_MAX_LORA_RANK,
    AdapterSpec,
    LoadAdapter,
    LoadRetries,
    LoraLimits,
    UnloadAdapter,
    adapter_rank,
    check_adapter,
    engine_adapters,
    lora_limits,
    plan_adapters,
)
from nebula.core.model import ModelSpec
from nebula.errors import ValidationError

LORA_BASE = ModelSpec(name="pair", source="/models/tiny", engine_args=("--enable-lora", "--max-lora-rank=8"))
PLAIN_BASE = ModelSpec(name="chat", source="/models/tiny")
TONE = AdapterSpec(name="tone", base="pair", source="/adapters/tone")


# --- the record ------------------------------------------------------------------------------------------

def test_an_adapter_record_round_trips_and_leaves_an_unknown_rank_out() -> None:
    assert AdapterSpec.from_dict(TONE.to_dict()) == TONE
    assert "rank" not in TONE.to_dict()
    ranked = AdapterSpec(name="tone", base="pair", source="org/tone-lora", rank=8)
    assert AdapterSpec.from_dict(ranked.to_dict()) == ranked


@pytest.mark.parametrize(("record", "field"), [
    ({"name": "Tone", "base": "pair", "source": "/a"}, "name"),
    ({"name": "tone", "base": "../pair", "source": "/a"}, "base"),
    ({"name": "tone", "base": "pair", "source": " "}, "source"),
    ({"name": "tone", "base": "pair", "source": "not a source"}, "source"),
    ({"name": "tone", "base": "pair", "source": "./tone"}, "source"),
    ({"name": "tone", "base": "pair", "source": "/a", "rank": 0}, "rank"),
    ({"name": "tone", "base": "pair", "source": "/a", "rank": True}, "rank"),
    ({"name": "pair", "base": "pair", "source": "/a"}, "name"),
    ({"base": "pair", "source": "/a"}, "name"),
])
def test_a_bad_adapter_record_names_its_field(record: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        AdapterSpec.from_dict(record)
    assert e.value.field == field


# --- the engine's flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "limits"), [
    ((), None),
    (("--max-lora-rank", "8"), None),
    (("--enable-lora",), LoraLimits(DEFAULT_MAX_LORA_RANK, 1)),
    (("--enable-lora", "--max-lora-rank=8", "--max-loras=2"), LoraLimits(8, 2)),
    (("--enable_lora", "--max_lora_rank", "32"), LoraLimits(32, 1)),
    (("--enable-lora", "--no-enable-lora"), None),
    (("--enable-lora=false",), None),
    (("--enable-lora=true", "--max-lora-rank", "64"), LoraLimits(64, 1)),
])
def test_lora_limits_read_the_flags_as_vllm_does(args: tuple[str, ...], limits: LoraLimits | None) -> None:
    assert lora_limits(args) == limits


def test_an_engine_with_lora_may_load_adapters_at_runtime_and_one_without_may_not() -> None:
    def env(args: tuple[str, ...]) -> dict[str, str]:
        spec = EngineSpec(instance="pair", model="pair", source="/models/tiny", port=18000, engine_args=args)
        return vllm_command(spec, EngineConfig(), cpu=True)[1]

    assert env(("--enable-lora",))["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env(())


# --- the checks when an adapter is added -----------------------------------------------------------------

@pytest.mark.parametrize(("config", "rank"), [
    ({"r": 4}, 4), ({"r": 4, "rank_pattern": {"q_proj": 16}}, 16), ({}, None), ({"r": "4"}, None),
    ({"r": True}, None), ([], None), (None, None),
])
def test_the_rank_comes_from_adapter_config(config: object, rank: int | None) -> None:
    assert adapter_rank(config) == rank


def test_a_base_without_lora_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValidationError) as e:
        check_adapter(AdapterSpec("tone", "chat", "/a"), PLAIN_BASE, 4)
    assert e.value.field == "base" and "--enable-lora" in e.value.message


def test_a_rank_above_the_bases_limit_is_refused_with_the_flag_to_raise() -> None:
    with pytest.raises(ValidationError) as e:
        check_adapter(TONE, LORA_BASE, 16)
    assert e.value.field == "rank" and "--max-lora-rank=16" in e.value.message
    with pytest.raises(ValidationError):  # a rank given when the files cannot be read counts the same
        check_adapter(AdapterSpec("tone", "pair", "org/tone", rank=9), LORA_BASE, None)


def test_the_rank_in_the_files_is_the_one_recorded() -> None:
    assert check_adapter(AdapterSpec("tone", "pair", "/a", rank=2), LORA_BASE, 8).rank == 8
    assert check_adapter(TONE, LORA_BASE, None).rank is None
    assert check_adapter(TONE, ModelSpec(name="pair", source="/m", engine_args=("--enable-lora",)), 16).rank == 16


# --- what the engine has loaded, and the plan ------------------------------------------------------------

def test_the_engines_model_list_says_which_adapters_it_has() -> None:
    listing = {"data": [{"id": "pair", "root": "/models/tiny", "parent": None},
                        {"id": "tone", "root": "/adapters/tone", "parent": "pair"}, "junk", {"parent": "pair"}]}
    assert engine_adapters(listing) == {"tone": "/adapters/tone"}
    assert engine_adapters({"data": "x"}) == {} == engine_adapters([])


def test_the_plan_unloads_first_then_loads_and_reloads_a_moved_source() -> None:
    plan = plan_adapters({"a": "/a", "b": "/b2", "c": "/c"}, {"b": "/b1", "c": "/c", "old": "/old"})
    assert plan == [UnloadAdapter("b", "source changed to /b2"), UnloadAdapter("old", "removed"),
                    LoadAdapter("a", "/a", "not loaded"), LoadAdapter("b", "/b2", "source changed")]
    assert plan_adapters({"c": "/c"}, {"c": "/c"}) == []


names = st.sampled_from(["a", "b", "c", "d"])
paths = st.sampled_from(["/p1", "/p2"])


@given(desired=st.dictionaries(names, paths), loaded=st.dictionaries(names, paths))
def test_applying_the_plan_makes_the_engine_hold_exactly_the_desired_adapters(desired: dict[str, str],
                                                                               loaded: dict[str, str]) -> None:
    engine = dict(loaded)
    actions = plan_adapters(desired, loaded)
    kinds = [type(a) for a in actions]
    assert kinds == sorted(kinds, key=lambda k: k is LoadAdapter)  # every unload before any load
    for action in actions:
        if isinstance(action, UnloadAdapter):
            assert action.name in engine
            del engine[action.name]
        else:
            assert action.name not in engine
            engine[action.name] = action.path
    assert engine == desired
    assert plan_adapters(desired, engine) == []


def test_a_refused_load_is_retried_later_and_later_up_to_the_cap() -> None:
    retries = LoadRetries(base_s=2.0, cap_s=10.0)
    key = ("pair", "tone", "/a")
    assert retries.due(key, 0.0)
    assert [retries.failed(key, 0.0) for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]
    assert not retries.due(key, 9.0) and retries.due(key, 10.0)
    retries.succeeded(key)
    assert retries.failed(key, 20.0) == 2.0
    retries.keep_only(set())
    assert retries.due(key, 20.0)
