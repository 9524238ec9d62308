"""The node agent's /metrics (an injected registry): instances, reconcile passes, engine restarts and failures.

GPU series are gpus.py's (sampled off the event loop); download series are the sources' own. New agent
metrics go here as attributes of AgentMetrics, created in its constructor.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nebula.core.model import InstanceStatus, Phase

# One pass lists units, reads spec files and checks /health of each engine: milliseconds to a second.
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Gauge("nebula_agent_instances", "Instances on this node by model and phase",
                               ["model", "phase"], registry=registry)
        self.actions = Counter("nebula_agent_actions", "Reconcile actions applied", ["action"], registry=registry)
        self.passes = Counter("nebula_agent_reconcile_passes", "Reconcile passes run", registry=registry)
        self.pass_seconds = Histogram("nebula_agent_reconcile_seconds", "Duration of one reconcile pass",
                                      buckets=PASS_BUCKETS, registry=registry)
        self.restarts = Counter("nebula_agent_engine_restarts", "Engine restarts after a failure (by the service "
                                "manager or by the agent)", ["model"], registry=registry)
        self.failures = Counter("nebula_agent_engine_failures", "Engines that exited with a failure",
                                ["model"], registry=registry)
        self._restarts_seen: dict[str, int] = {}

    @staticmethod
    def create(registry: CollectorRegistry) -> AgentMetrics:
        return AgentMetrics(registry)

    def observe(self, statuses: Mapping[str, InstanceStatus]) -> None:
        """The instances this node reports now: phase gauges per model, and restarts since the last report.

        A restart count seen for the first time is a baseline (a restarted agent finds engines that
        restarted before it came), so only increases count.
        """
        counts = Tally((s.model, s.phase) for s in statuses.values())
        self.instances.clear()  # models that left have no series
        for model in sorted({s.model for s in statuses.values()}):
            self.restarts.labels(model)
            self.failures.labels(model)
            for phase in Phase:
                self.instances.labels(model, phase.value).set(counts.get((model, phase), 0))
        for inst, st in statuses.items():
            before = self._restarts_seen.get(inst)
            if before is not None and st.restarts > before:
                self.restarts.labels(st.model).inc(st.restarts - before)
        self._restarts_seen = {inst: st.restarts for inst, st in statuses.items()}
