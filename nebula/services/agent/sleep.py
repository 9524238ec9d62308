"""The agent's sleep applier: each healthy engine sleeps at its placement's sleep level (0: awake).

Only engines started with sleep mode (EngineSpec.sleep_mode: a GPU replica of a model whose idle action is
sleep) can sleep; a placement asking another engine to sleep is reported in its status and left awake. What
level each engine is at is remembered here; unknown (an agent restart, an engine that restarted) is asked of
the engine (/is_sleeping). An engine that was asleep is reported SLEEPING (the gateway routes nothing to it);
one that woke is READY again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from typing import Protocol

from nebula.core.engine_spec import EngineSpec
from nebula.core.model import Phase, Placement
from nebula.errors import TemporaryError

log = logging.getLogger("nebula.agent")
ASLEEP_UNKNOWN_LEVEL = -1


class EngineSleep(Protocol):
    """adapters/engine_sleep.py; raises TemporaryError when the engine cannot be reached, and any other
    exception when it answers with an error."""

    async def sleep(self, endpoint: str, level: int) -> None: ...

    async def wake_up(self, endpoint: str) -> None: ...

    async def is_sleeping(self, endpoint: str) -> bool: ...


class SleepSync:
    def __init__(self, engine: EngineSleep | None, node: str = "") -> None:
        self.engine = engine  # None: this agent does not manage sleep (tests of other parts)
        self.node = node
        self.levels: dict[str, int] = {}
        """Instance -> the level its engine is at (0 awake; -1 asleep at a level we did not set)."""
        self.errors: dict[str, str] = {}
        self._refused: dict[str, int] = {}
        """Instance -> the level its engine refused: not asked again until the placement wants another."""

    async def sync(self, placements: Mapping[str, Placement], files: Mapping[str, EngineSpec],
                   healthy: Set[str]) -> None:
        for inst in list(self.levels):
            if inst not in healthy:  # stopped, restarting or unreachable: ask again once it is back
                del self.levels[inst]
        self.errors = {i: e for i, e in self.errors.items() if i in healthy}
        self._refused = {i: lvl for i, lvl in self._refused.items() if i in healthy}
        if self.engine is None:
            return
        for inst in sorted(healthy):
            p, spec = placements.get(inst), files.get(inst)
            if p is None or spec is None or self._refused.get(inst) == p.sleep_level:
                continue
            self._refused.pop(inst, None)
            try:
                await self._one(inst, p, spec)
            except TemporaryError as e:
                self.levels.pop(inst, None)
                log.warning("engine %s: sleep or wake failed (%s); trying again next pass", inst, e,
                            extra={"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node})
            except Exception as e:  # the engine refused: say so in the status, and do not ask every pass
                self.levels.pop(inst, None)
                self._refused[inst] = p.sleep_level
                self.errors[inst] = f"cannot {'sleep' if p.sleep_level else 'wake'}: {e}"
                log.warning("engine %s: %s", inst, self.errors[inst],
                            extra={"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node})

    async def _one(self, inst: str, p: Placement, spec: EngineSpec) -> None:
        assert self.engine is not None
        want = p.sleep_level
        if not spec.sleep_mode:
            if want:
                self.errors[inst] = "cannot sleep: the engine runs without sleep mode (CPU, or not a sleeping model)"
            return
        have = self.levels.get(inst)
        if have is None:
            have = ASLEEP_UNKNOWN_LEVEL if await self.engine.is_sleeping(spec.endpoint) else 0
            self.levels[inst] = have
        if have == want:
            return
        fields = {"NEBULA_INSTANCE": inst, "NEBULA_NODE": self.node, "NEBULA_MODEL": p.model.name}
        if have != 0:  # asleep at another level (or one we do not know): wake first, then sleep again if asked
            await self.engine.wake_up(spec.endpoint)
            self.levels[inst] = 0
            log.info("engine %s woke up", inst, extra=fields)
        if want:
            await self.engine.sleep(spec.endpoint, want)
            self.levels[inst] = want
            log.info("engine %s sleeps at level %d", inst, want, extra=fields)
        self.errors.pop(inst, None)

    def phase(self, inst: str, phase: Phase, message: str) -> tuple[Phase, str]:
        """A ready engine that is asleep is SLEEPING; a refusal is added to the message."""
        level = self.levels.get(inst, 0)
        if phase is Phase.READY and level:
            what = f"level {level}" if level > 0 else "a level set before this agent started"
            return Phase.SLEEPING, f"asleep ({what}): wakes when a request arrives"
        if inst in self.errors:
            return phase, "; ".join(m for m in (message, self.errors[inst]) if m)
        return phase, message
