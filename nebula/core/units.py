"""How a node runs engine instances: systemd units over D-Bus, or supervised child processes.

Both back-ends run the same command, `nebula engine run <instance>`, which reads the instance's spec from
`<run_dir>/engines/<instance>.json`. The node agent depends on the `EngineUnits` protocol only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

ENGINE_UNIT_PREFIX = "nebula-engine@"
ENGINE_UNIT_SUFFIX = ".service"


def engine_unit_name(instance: str) -> str:
    return f"{ENGINE_UNIT_PREFIX}{instance}{ENGINE_UNIT_SUFFIX}"


def instance_of_unit(unit: str) -> str | None:
    if unit.startswith(ENGINE_UNIT_PREFIX) and unit.endswith(ENGINE_UNIT_SUFFIX):
        inst = unit[len(ENGINE_UNIT_PREFIX):-len(ENGINE_UNIT_SUFFIX)]
        return inst or None
    return None


class UnitState(enum.Enum):
    """systemd's ActiveState, which the process back-end mirrors."""

    ACTIVATING = "activating"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"
    INACTIVE = "inactive"
    FAILED = "failed"
    RELOADING = "reloading"

    @staticmethod
    def parse(value: str) -> UnitState:
        try:
            return UnitState(value)
        except ValueError:
            return UnitState.INACTIVE


@dataclass(frozen=True)
class UnitStatus:
    instance: str
    state: UnitState
    sub_state: str = ""
    restarts: int = 0
    main_pid: int = 0
    result: str = ""


class EngineUnits(Protocol):
    async def list(self) -> Mapping[str, UnitStatus]:
        """Every engine instance this node knows (running, starting, stopping or failed), by instance."""
        ...

    async def start(self, instance: str) -> None:
        """Start the instance's engine; returns once the start is queued (not when the model is ready)."""
        ...

    async def stop(self, instance: str) -> None:
        """Stop the instance's engine (graceful drain, then kill); returns once the stop is queued."""
        ...

    async def reset(self, instance: str) -> None:
        """Forget a failed instance's state so it can start afresh."""
        ...

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        """The last `lines` lines the instance's engine wrote (its journal, or its log file), oldest first."""
        ...

    @property
    def restarts_failed(self) -> bool:
        """Whether the back-end restarts a crashed engine itself (systemd's Restart=), so the agent need not."""
        ...

    async def close(self) -> None: ...
