"""A model's scaling policy: what an operator may ask for, and the one-line reason when it cannot be."""

from __future__ import annotations

from typing import Any

import pytest

from nebula.core.elastic import IdleAction, ScalingPolicy
from nebula.core.model import ModelSpec, Placement
from nebula.core.placement import place
from nebula.errors import ValidationError
from tests.unit.test_placement import node


def spec(scaling: dict[str, Any] | None, replicas: int = 1) -> ModelSpec:
    obj: dict[str, Any] = {"name": "m", "source": "/models/m", "replicas": replicas}
    if scaling is not None:
        obj["scaling"] = scaling
    return ModelSpec.from_dict(obj)


def test_no_policy_is_a_fixed_count_and_reads_back_as_before() -> None:
    s = spec(None, replicas=2)
    assert s.scaling is None
    assert "scaling" not in s.to_dict()


def test_idle_unload_alone_means_scale_to_zero() -> None:
    p = spec({"idle_unload_s": 600}).scaling
    assert p == ScalingPolicy(min_replicas=0, max_replicas=1, idle_unload_s=600.0)


def test_a_policy_round_trips_through_its_json() -> None:
    s = spec({"min_replicas": 1, "max_replicas": 4, "idle_action": "sleep", "sleep_level": 2, "priority": 3,
              "target_inflight": 16}, replicas=2)
    assert s.scaling is not None and s.scaling.idle_action is IdleAction.SLEEP
    assert ModelSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(("scaling", "replicas", "field", "says"), [
    ({"min_replicas": 3, "max_replicas": 2}, 2, "scaling.min_replicas", "must not be above max_replicas (2)"),
    ({"min_replicas": 0}, 1, "scaling.idle_unload_s", "is required when min_replicas is 0"),
    ({"idle_unload_s": -5}, 1, "scaling.idle_unload_s", "must be more than 0"),
    ({"idle_unload_s": 0}, 1, "scaling.idle_unload_s", "must be more than 0"),
    ({"min_replicas": 0, "max_replicas": 0, "idle_unload_s": 5}, 1, "scaling.max_replicas", "at least 1"),
    ({"min_replicas": 1, "max_replicas": 2}, 3, "replicas", "must lie between min_replicas (1) and max_replicas (2)"),
    ({"idle_action": "hibernate", "idle_unload_s": 5}, 1, "scaling.idle_action", "'stop' or 'sleep'"),
    ({"sleep_level": 3, "idle_unload_s": 5}, 1, "sleep_level", "between 1 and 2"),
    ({"max_replicas": 65}, 1, "max_replicas", "between 0 and 64"),
    ({"min_replicas": True}, 1, "min_replicas", "not a boolean"),
    ([], 1, "scaling", "must be a JSON object"),
])
def test_a_bad_policy_is_refused_naming_the_field(scaling: Any, replicas: int, field: str, says: str) -> None:
    with pytest.raises(ValidationError) as e:
        spec(scaling, replicas)
    assert e.value.field == field and says in e.value.message


def test_a_placement_carries_neither_the_count_nor_the_policy() -> None:
    elastic = spec({"min_replicas": 1, "max_replicas": 3, "idle_unload_s": 60})
    placed = place({"m": elastic}, {"a": node("a")}, {}).placements["m"]
    assert placed.model.scaling is None and placed.model.replicas == 1
    # A policy change rewrites no placement (no engine restarts for it).
    retuned = spec({"min_replicas": 1, "max_replicas": 5, "idle_unload_s": 30})
    assert place({"m": retuned}, {"a": node("a")}, {"m": placed}).placements["m"] == placed


def test_a_sleeping_placement_round_trips_and_an_awake_one_reads_as_before() -> None:
    awake = Placement(instance="m", node="a", model=spec(None), port=18000)
    assert "sleep_level" not in awake.to_dict()
    asleep = Placement(instance="m", node="a", model=spec(None), port=18000, sleep_level=2)
    assert Placement.from_dict(asleep.to_dict()) == asleep
