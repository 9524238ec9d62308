"""What an elastic model is doing now, in one word, for /v1/models and the admin views (a client may ignore it)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from nebula.core.model import Phase

# Phases of a replica on its way to READY: the model is waking (or scaling up from zero).
_COMING = frozenset({Phase.PENDING, Phase.DOWNLOADING, Phase.STARTING})


class ModelState(enum.StrEnum):
    READY = "ready"  # at least one replica takes requests
    WAKING = "waking"  # none does yet, but a wake was asked for or a replica is on its way
    SLEEPING = "sleeping"  # its replicas sleep (vLLM sleep mode): the next request wakes them in seconds
    IDLE = "idle"  # scaled to zero: the next request starts a replica (a cold start)


def model_state(phases: Mapping[Phase, int], waking: bool) -> ModelState:
    """`phases`: how many of the model's instances are in each phase; `waking`: a wake was asked for (a request
    is held for it, or /nebula/wake/<model> exists)."""
    if phases.get(Phase.READY, 0) > 0:
        return ModelState.READY
    if waking or any(phases.get(p, 0) > 0 for p in _COMING):
        return ModelState.WAKING
    if phases.get(Phase.SLEEPING, 0) > 0:
        return ModelState.SLEEPING
    return ModelState.IDLE
