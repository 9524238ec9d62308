"""plan(desired, actual): the agent's pure reconcile step."""

from __future__ import annotations

from nebula.core.engine_spec import EngineSpec
from nebula.core.model import Phase
from nebula.core.phase import Failures, observe_phase
from nebula.core.reconcile import Actual, RemoveSpec, ResetFailed, Start, Stop, plan
from nebula.core.units import UnitState, UnitStatus


def spec(inst: str, port: int = 18000, source: str = "/m") -> EngineSpec:
    return EngineSpec(instance=inst, model=inst.split(":")[0], source=source, port=port)


def unit(inst: str, state: UnitState, restarts: int = 0) -> UnitStatus:
    return UnitStatus(instance=inst, state=state, restarts=restarts)


def test_starts_what_is_missing() -> None:
    assert plan({"a": spec("a")}, {}) == [Start("a", spec("a"))]


def test_running_with_same_spec_is_left_alone_readoption() -> None:
    actual = {"a": Actual(unit("a", UnitState.ACTIVE), spec("a"))}
    assert plan({"a": spec("a")}, actual) == []
    actual = {"a": Actual(unit("a", UnitState.ACTIVATING), spec("a"))}
    assert plan({"a": spec("a")}, actual) == []


def test_orphan_is_stopped_then_its_spec_removed() -> None:
    actual = {"x": Actual(unit("x", UnitState.ACTIVE), spec("x"))}
    assert plan({}, actual) == [Stop("x", "not placed on this node")]
    assert plan({}, {"x": Actual(unit("x", UnitState.DEACTIVATING), spec("x"))}) == []
    assert plan({}, {"x": Actual(None, spec("x"))}) == [RemoveSpec("x")]


def test_stops_come_before_starts() -> None:
    actual = {"old": Actual(unit("old", UnitState.ACTIVE), spec("old", 18000))}
    actions = plan({"new": spec("new", 18000)}, actual)
    assert actions == [Stop("old", "not placed on this node"), Start("new", spec("new", 18000))]


def test_changed_spec_restarts_in_two_passes() -> None:
    actual = {"a": Actual(unit("a", UnitState.ACTIVE), spec("a", 18000))}
    assert plan({"a": spec("a", 18001)}, actual) == [Stop("a", "spec changed")]
    assert plan({"a": spec("a", 18001)}, {"a": Actual(None, spec("a", 18000))}) == [Start("a", spec("a", 18001))]


def test_failed_unit_is_not_restarted_until_spec_changes() -> None:
    failed = {"a": Actual(unit("a", UnitState.FAILED), spec("a"))}
    assert plan({"a": spec("a")}, failed) == []
    assert plan({"a": spec("a", 18005)}, failed) == [ResetFailed("a"), Start("a", spec("a", 18005))]
    assert plan({}, failed) == [ResetFailed("a"), RemoveSpec("a")]


def test_phase_from_observations() -> None:
    assert observe_phase(blocked="source path /x does not exist", unit=None, healthy=False) == (
        Phase.FAILED, "source path /x does not exist")
    assert observe_phase(blocked=None, unit=None, healthy=False)[0] is Phase.PENDING
    assert observe_phase(blocked=None, unit=unit("a", UnitState.ACTIVATING), healthy=False)[0] is Phase.STARTING
    assert observe_phase(blocked=None, unit=unit("a", UnitState.ACTIVE), healthy=False)[0] is Phase.STARTING
    assert observe_phase(blocked=None, unit=unit("a", UnitState.ACTIVE), healthy=True) == (Phase.READY, "")
    assert observe_phase(blocked=None, unit=unit("a", UnitState.DEACTIVATING), healthy=True)[0] is Phase.DRAINING
    ph, msg = observe_phase(blocked=None, unit=unit("a", UnitState.FAILED), healthy=False,
                            failures=Failures(restarts=3))
    assert ph is Phase.FAILED and "3 restart" in msg


def test_failed_unit_restarts_when_the_agent_policy_allows() -> None:
    failed = {"a": Actual(unit("a", UnitState.FAILED), spec("a"))}
    assert plan({"a": spec("a")}, failed, frozenset({"a"})) == [ResetFailed("a"), Start("a", spec("a"))]
    assert plan({}, failed, frozenset({"a"})) == [ResetFailed("a"), RemoveSpec("a")]
