"""Which idle model of lower priority gives way to one that fits nowhere (pure; the scheduler tries them in order)."""

from __future__ import annotations

from typing import Any

from nebula.core.elastic import ScaleState
from nebula.core.model import ModelSpec
from nebula.core.scaling import Action, Fleet, Load
from nebula.core.scaling_evict import candidates, evictable

NOW = 1_000_000.0


def spec(name: str, **scaling: Any) -> ModelSpec:
    obj: dict[str, Any] = {"name": name, "source": "/m", "gpus_per_replica": 1}
    if scaling:
        obj["scaling"] = scaling
    return ModelSpec.from_dict(obj)


def state(name: str, replicas: int = 1, sleep: int = 0, since: float = NOW - 3600) -> ScaleState:
    return ScaleState(model=name, replicas=replicas, sleep_level=sleep, since=since)


def test_lowest_priority_then_longest_quiet_first_and_only_the_evictable() -> None:
    specs = {"want": spec("want", min_replicas=1, max_replicas=1, priority=5),
             "a": spec("a", idle_unload_s=600, priority=1), "b": spec("b", idle_unload_s=600, priority=0),
             "c": spec("c", idle_unload_s=600, priority=1), "same": spec("same", idle_unload_s=600, priority=5),
             "kept": spec("kept", min_replicas=1, max_replicas=2, priority=0), "fixed": spec("fixed"),
             "deep": spec("deep", idle_unload_s=600, priority=0), "gone": spec("gone", idle_unload_s=600),
             "busy": spec("busy", idle_unload_s=600), "recent": spec("recent", idle_unload_s=600)}
    states = {"a": state("a"), "b": state("b"), "c": state("c", since=NOW - 7200), "same": state("same"),
              "kept": state("kept"), "deep": state("deep", sleep=2), "gone": state("gone", replicas=0),
              "busy": state("busy"), "recent": state("recent", since=NOW - 10)}
    fleet = Fleet(loads={"busy": Load(running=1), "a": Load(last_request=NOW - 120)}, reporters=1)
    found = candidates("want", specs, states, fleet, now=NOW, quiet_s=60)
    assert [d.model for d in found] == ["b", "c", "a"]
    assert all(d.action is Action.EVICT and d.state.replicas == 0 for d in found)
    assert found[0].reason.startswith("evicted for want (priority 5 over 0)")
    assert evictable(specs["a"]) and not evictable(specs["kept"]) and not evictable(specs["fixed"])


def test_no_fresh_report_evicts_nothing_and_an_unknown_model_asks_for_nothing() -> None:
    specs = {"want": spec("want", priority=5), "a": spec("a", idle_unload_s=600)}
    assert candidates("want", specs, {"a": state("a")}, Fleet(), now=NOW, quiet_s=60) == []
    assert candidates("nope", specs, {"a": state("a")}, Fleet(reporters=1), now=NOW, quiet_s=60) == []
