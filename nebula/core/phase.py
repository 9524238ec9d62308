"""An instance's phase, derived from what the agent observes; pure so every transition is testable."""

from __future__ import annotations

from nebula.core.model import Phase
from nebula.core.units import UnitState, UnitStatus


def observe_phase(*, blocked: str | None, unit: UnitStatus | None, healthy: bool,
                  downloading: bool = False) -> tuple[Phase, str]:
    """(phase, message) of a placed instance.

    `blocked` is why it cannot start at all (e.g. its source path does not exist); `healthy` is whether its
    engine answered /health on the last check.
    """
    if blocked is not None:
        return Phase.FAILED, blocked
    if downloading:
        return Phase.DOWNLOADING, "fetching model files"
    if unit is None or unit.state is UnitState.INACTIVE:
        return Phase.PENDING, "waiting to start"
    if unit.state is UnitState.FAILED:
        detail = f" ({unit.result})" if unit.result else ""
        return Phase.FAILED, f"engine unit failed{detail} after {unit.restarts} restart(s)"
    if unit.state is UnitState.DEACTIVATING:
        return Phase.DRAINING, "stopping"
    if unit.state is UnitState.ACTIVE and healthy:
        return Phase.READY, ""
    if unit.state is UnitState.ACTIVE:
        return Phase.STARTING, "engine not answering /health yet"
    return Phase.STARTING, "loading model"
