"""The gateway's routing view of the cluster: READY replicas per model, the requests this gateway has in
flight to each, and (through its LoadBook) each engine's last polled load.

Fed by the mirror of /nebula/instances/ with the full contents each time, so an update simply
replaces the view. In-flight counts are this gateway's own and survive updates: a replica that leaves
READY keeps its count until its last request finishes, it just gets no new ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Any

from nebula.adapters.timeouts import timeout
from nebula.core.model import InstanceStatus, Phase
from nebula.core.routing import LoadPolicy, Replica, phase_counts, pick_replica, ready_replicas
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.load import LoadBook

log = logging.getLogger(__name__)


class ReplicaTable:
    def __init__(self, policy: LoadPolicy | None = None, loads: LoadBook | None = None) -> None:
        self.policy = policy or LoadPolicy()
        self.loads = loads or LoadBook(max_age_s=3.0)
        self._statuses: dict[str, InstanceStatus] = {}
        self._ready: dict[str, tuple[Replica, ...]] = {}
        self._models: frozenset[str] = frozenset()
        self._adapters: dict[str, frozenset[str]] = {}  # LoRA adapter -> the READY instances that have it loaded
        self._inflight: dict[str, int] = {}
        self._turns: dict[str, int] = {}
        self._changed = asyncio.Event()
        self.synced = False

    # -- feeding ---------------------------------------------------------------------------------

    def update(self, state: MirrorState[InstanceStatus]) -> None:
        """Replace the view with the full current contents of /nebula/instances/ (its mirror feeds it)."""
        statuses = dict(state.records)
        self._statuses = statuses
        self._models = frozenset(st.model for st in statuses.values())
        self._ready = ready_replicas(statuses.values())
        adapters: dict[str, set[str]] = {}
        for st in statuses.values():
            if st.phase is Phase.READY:
                for name in st.adapters:
                    adapters.setdefault(name, set()).add(st.instance)
        self._adapters = {name: frozenset(instances) for name, instances in adapters.items()}
        self.loads.assign_models({r.endpoint: r.model for reps in self._ready.values() for r in reps})
        self.synced = True
        # Wake everything waiting for a replica, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- routing ---------------------------------------------------------------------------------

    def pick(self, model: str, exclude: Collection[str] = (), prefix: Callable[[], str | None] | None = None
             ) -> Replica | None:
        """The READY replica of `model` for the next request (see routing.pick_replica), not in `exclude`.
        `prefix` gives the request's affinity key; it is asked only when there are replicas to choose from
        (hashing the prompt costs 2-3 us, and most models have one replica)."""
        turn = self._turns.get(model, 0)
        ready = self._ready.get(model, ())
        key = prefix() if prefix is not None and len(ready) > 1 else None
        replica = pick_replica(ready, self._inflight, self.loads.loads(), exclude, turn, key, self.policy)
        if replica is not None:
            self._turns[model] = turn + 1
        return replica

    def has_candidate(self, model: str, exclude: Collection[str] = (),
                      eligible: Callable[[Replica], bool] | None = None) -> bool:
        """Whether `model` has a READY replica outside `exclude` (and for which `eligible` holds, if given)."""
        return any(r.endpoint not in exclude and (eligible is None or eligible(r)) for r in self._ready.get(model, ()))

    async def wait_for_replica(self, model: str, timeout_s: float,
                               eligible: Callable[[Replica], bool] | None = None) -> bool:
        """Wait up to `timeout_s` for `model` to have a READY replica (one for which `eligible` holds, if given:
        a woken base that has loaded the adapter asked for); True when it has one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.has_candidate(model, eligible=eligible):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return False
        return True

    def track(self, replica: Replica) -> InFlight:
        """Count one request in flight to `replica` for the duration of a `with` block."""
        return InFlight(self._inflight, replica.endpoint)

    # -- views -----------------------------------------------------------------------------------

    def knows(self, model: str) -> bool:
        """True when any instance of `model` is recorded (bounds the label values of metrics)."""
        return model in self._models

    def nodes_of(self, model: str) -> frozenset[str]:
        """The nodes an instance of `model` is on, whatever its phase (its engine may be logging why it fails)."""
        return frozenset(st.node for st in self._statuses.values() if st.model == model and st.node)

    def with_adapter(self, adapter: str) -> frozenset[str]:
        """The READY instances whose engines have the LoRA adapter `adapter` loaded."""
        return self._adapters.get(adapter, frozenset())

    def inflight(self, endpoint: str) -> int:
        return self._inflight.get(endpoint, 0)

    def ready(self) -> Mapping[str, tuple[Replica, ...]]:
        return self._ready

    def ready_endpoints(self) -> frozenset[str]:
        """The endpoints the load poller reads (those of READY replicas)."""
        return frozenset(r.endpoint for reps in self._ready.values() for r in reps)

    def phases(self) -> dict[str, Counter[Phase]]:
        return phase_counts(self._statuses.values())

    def draining_inflight(self) -> dict[str, int]:
        """In-flight counts of endpoints that are no longer READY (requests still finishing there)."""
        ready = {r.endpoint for reps in self._ready.values() for r in reps}
        return {ep: n for ep, n in self._inflight.items() if ep not in ready}

    def _load_json(self, endpoint: str, now: float) -> dict[str, float] | None:
        sample = self.loads.sample(endpoint)
        if sample is None:
            return None
        return {"waiting": sample.load.waiting, "running": sample.load.running,
                "kv_cache_usage": sample.load.kv_cache_usage, "age_s": round(max(0.0, now - sample.at), 3)}

    def to_json(self, now: float) -> dict[str, Any]:
        """The JSON of GET /v1/admin/replicas; `now` is on the load poller's clock (for the samples' age)."""
        models: dict[str, Any] = {}
        for model, counts in sorted(self.phases().items()):
            models[model] = {
                "phases": {p.value: n for p, n in sorted(counts.items())},
                "ready": [{"instance": r.instance, "endpoint": r.endpoint, "task": r.task.value,
                           "inflight": self.inflight(r.endpoint), "load": self._load_json(r.endpoint, now)}
                          for r in self._ready.get(model, ())],
            }
        return {"synced": self.synced, "models": models, "draining_inflight": self.draining_inflight()}


class InFlight:
    """ReplicaTable.track's block: a class, not a @contextmanager generator, since every request enters one
    (a generator and its wrapper cost about twice as much)."""

    __slots__ = ("_counts", "_endpoint")

    def __init__(self, counts: dict[str, int], endpoint: str) -> None:
        self._counts = counts
        self._endpoint = endpoint

    def __enter__(self) -> None:
        self._counts[self._endpoint] = self._counts.get(self._endpoint, 0) + 1

    def __exit__(self, *exc: object) -> None:
        left = self._counts[self._endpoint] - 1
        if left:
            self._counts[self._endpoint] = left
        else:
            del self._counts[self._endpoint]
