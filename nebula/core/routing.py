"""Routing policy: which replica of a model gets the next request. Pure functions, no I/O.

The router keeps the state (ready replicas, outstanding requests, a turn counter per model) and asks
these functions for decisions, so the policy is tested exhaustively without sockets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from nebula.core.model import InstanceStatus, Phase, Task


@dataclass(frozen=True)
class Replica:
    """A READY instance the router may send requests to. Identity for load tracking is the endpoint."""

    instance: str
    model: str
    endpoint: str
    task: Task


def ready_replicas(statuses: Iterable[InstanceStatus]) -> dict[str, tuple[Replica, ...]]:
    """Per model, its READY replicas with an endpoint, in a stable order (by endpoint, then instance).

    A stable order is what makes tie-breaking deterministic: the same table and turn always pick
    the same replica. Two instances claiming one endpoint (a stale record beside its successor) count once.
    """
    by_model: dict[str, dict[str, Replica]] = {}
    for st in statuses:
        if st.phase is not Phase.READY or not st.endpoint:
            continue
        endpoint = st.endpoint.rstrip("/")
        replicas = by_model.setdefault(st.model, {})
        seen = replicas.get(endpoint)
        if seen is None or st.instance < seen.instance:
            replicas[endpoint] = Replica(instance=st.instance, model=st.model, endpoint=endpoint,
                                         task=st.task)
    return {model: tuple(sorted(reps.values(), key=lambda r: (r.endpoint, r.instance)))
            for model, reps in by_model.items()}


def pick_least_outstanding(candidates: Sequence[Replica], outstanding: Mapping[str, int],
                           exclude: Collection[str], turn: int) -> Replica | None:
    """The replica with the fewest outstanding requests; among equals, the `turn`-th (mod their count).

    `outstanding` is keyed by endpoint (missing = 0); `exclude` holds endpoints already tried for this
    request. The caller advances `turn` after each pick, so equal replicas take turns (round-robin)
    instead of the first one soaking up every request of a burst.
    """
    allowed = [r for r in candidates if r.endpoint not in exclude]
    if not allowed:
        return None
    least = min(outstanding.get(r.endpoint, 0) for r in allowed)
    ties = [r for r in allowed if outstanding.get(r.endpoint, 0) == least]
    return ties[turn % len(ties)]


def phase_counts(statuses: Iterable[InstanceStatus]) -> dict[str, Counter[Phase]]:
    """Per model, how many of its instances are in each phase (for /metrics and /v1/models)."""
    out: dict[str, Counter[Phase]] = {}
    for st in statuses:
        out.setdefault(st.model, Counter())[st.phase] += 1
    return out
