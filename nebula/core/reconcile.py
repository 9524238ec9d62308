"""The node agent's reconcile step: a pure `plan(desired, actual) -> actions`; the agent's applier does the I/O.

Surplus is stopped before anything missing is started, so GPU memory and ports are free for the newcomers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nebula.core.engine_spec import EngineSpec
from nebula.core.units import UnitState, UnitStatus

RUNNING_STATES = frozenset({UnitState.ACTIVE, UnitState.ACTIVATING, UnitState.RELOADING})


@dataclass(frozen=True)
class Actual:
    """What the node has for one instance: its unit (None: no unit) and the spec it was started with."""

    unit: UnitStatus | None
    spec: EngineSpec | None


@dataclass(frozen=True)
class Stop:
    instance: str
    reason: str


@dataclass(frozen=True)
class Start:
    instance: str
    spec: EngineSpec


@dataclass(frozen=True)
class ResetFailed:
    instance: str


@dataclass(frozen=True)
class RemoveSpec:
    instance: str


Action = Stop | Start | ResetFailed | RemoveSpec


def plan(desired: Mapping[str, EngineSpec], actual: Mapping[str, Actual],
         restart: frozenset[str] = frozenset(), hold: frozenset[str] = frozenset()) -> list[Action]:
    """Actions that move the node from `actual` to `desired`, stops first.

    - running but not desired: stop (an orphan holds GPU memory), unless in `hold` (a removed replica still
      finishing its in-flight requests: core/engine_drain.py);
    - running with another spec: stop now, start on a later pass once it is down;
    - failed and not desired: reset, so the unit is forgotten;
    - failed with the desired spec: left alone (systemd's restarts are spent; the agent reports it failed),
      unless it is in `restart` (the agent's own restart policy allows one more); a changed spec resets it
      and starts afresh;
    - desired with no running unit: (re)write the spec and start;
    - a spec file with no unit and not desired: remove it.
    """
    stops: list[Action] = []
    cleanups: list[Action] = []
    starts: list[Action] = []
    for inst in sorted(set(actual) | set(desired)):
        want = desired.get(inst)
        have = actual.get(inst, Actual(unit=None, spec=None))
        state = have.unit.state if have.unit else UnitState.INACTIVE
        if state in RUNNING_STATES:
            if want is None:
                if inst not in hold:
                    stops.append(Stop(inst, "not placed on this node"))
            elif have.spec != want:
                stops.append(Stop(inst, "spec changed"))
            continue
        if state is UnitState.DEACTIVATING:
            continue  # wait for it to finish stopping
        if state is UnitState.FAILED:
            if want is None:
                cleanups.append(ResetFailed(inst))
                if have.spec is not None:
                    cleanups.append(RemoveSpec(inst))
            elif have.spec != want or inst in restart:
                cleanups.append(ResetFailed(inst))
                starts.append(Start(inst, want))
            continue
        if want is not None:
            starts.append(Start(inst, want))
        elif have.spec is not None:
            cleanups.append(RemoveSpec(inst))
    return stops + cleanups + starts
