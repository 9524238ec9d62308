"""An instance's phase history (core/model.py `with_history`): what the agent adds on each change of phase,
how much it keeps, what a record may carry, and how `nebula show` tells it."""

from __future__ import annotations

import pytest

from nebula.cli.show import phase_path, show_text
from nebula.core.model import PHASE_HISTORY, InstanceStatus, Phase, with_history
from nebula.errors import ValidationError


def status(phase: Phase, since: float) -> InstanceStatus:
    return InstanceStatus(instance="m:1", model="m", node="n1", phase=phase, endpoint="http://n1:18000", since=since)


def test_a_change_of_phase_keeps_the_one_it_left_and_the_same_phase_adds_nothing() -> None:
    first = status(Phase.DOWNLOADING, 10.0)
    assert with_history(None, first) == first
    starting = with_history(first, status(Phase.STARTING, 70.0))
    assert starting.history == ((Phase.DOWNLOADING, 10.0),)
    assert with_history(starting, status(Phase.STARTING, 70.0)) == starting
    ready = with_history(starting, status(Phase.READY, 150.0))
    assert ready.history == ((Phase.DOWNLOADING, 10.0), (Phase.STARTING, 70.0))


def test_only_the_latest_phases_are_kept() -> None:
    st = status(Phase.STARTING, 0.0)
    for n in range(1, 30):  # a replica that keeps failing and restarting
        st = with_history(st, status(Phase.FAILED if n % 2 else Phase.STARTING, float(n)))
    assert len(st.history) == PHASE_HISTORY and st.history[-1] == (Phase.STARTING, 28.0)


@pytest.mark.parametrize("history", [
    "starting", [["starting"]], [["starting", "x"]], [["warming", 1.0]], [[1, 2.0]], [["ready", True]],
    [["ready", 1.0]] * 100])
def test_a_record_with_a_damaged_history_is_refused(history: object) -> None:
    record = status(Phase.READY, 5.0).to_dict() | {"history": history}
    with pytest.raises(ValidationError, match="history"):
        InstanceStatus.from_dict(record)


def test_a_record_keeps_its_history_and_a_long_one_is_cut() -> None:
    record = status(Phase.READY, 50.0).to_dict() | {"history": [["starting", float(n)] for n in range(20)]}
    assert InstanceStatus.from_dict(record).history == tuple((Phase.STARTING, float(n)) for n in range(12, 20))


def test_nebula_show_tells_how_each_replica_got_to_its_phase() -> None:
    instance = {"instance": "m:1", "phase": "ready", "node": "n1", "since": 1150.0, "restarts": 0,
                "history": [["downloading", 1000.0], ["starting", 1040.0]]}
    assert phase_path(instance) == "downloading 40 s -> starting 110 s -> ready"
    assert phase_path(instance | {"since": 1040.0 + 600}) == "downloading 40 s -> starting 10 min -> ready"
    text = show_text({"name": "m", "spec": None, "ready": 1, "instances": [instance]})
    assert text.endswith("  m:1  downloading 40 s -> starting 110 s -> ready")
