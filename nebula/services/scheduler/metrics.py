"""The scheduler's /metrics, on an injected registry.

Leadership and pass timing are kept as they happen; the state gauges (nodes, gone nodes, placements,
pending models) are read from the scheduler at scrape time, so there is no second copy to keep in step
and no stale series for a node or model that left. Only the leader reports state: it is the one that
acts on it, and a standby's view would count everything twice in a sum over schedulers.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.core.model import NodeRecord, Placement

# A pass over a small fleet takes milliseconds; 1,000 models over 200 nodes about half a second.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class SchedulerState(Protocol):
    """What the collector reads from the scheduler (its mirrors and its last pass)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def nodes(self) -> Mapping[str, NodeRecord]: ...

    @property
    def placements(self) -> Mapping[str, Placement]: ...

    @property
    def pending(self) -> Mapping[str, str]: ...

    @property
    def gone_since(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class SchedulerMetrics:
    leader: Gauge
    pass_seconds: Histogram
    changes: Counter
    fenced: Counter
    rollouts: Counter

    @staticmethod
    def create(registry: CollectorRegistry, state: SchedulerState, clock: Callable[[], float]) -> SchedulerMetrics:
        registry.register(_StateCollector(state, clock))
        changes = Counter("nebula_scheduler_placement_changes", "Placements written or deleted by this scheduler",
                          ["change"], registry=registry)
        for change in ("write", "delete"):
            changes.labels(change)  # both series exist from the start, so rate() has a zero to start from
        return SchedulerMetrics(
            leader=Gauge("nebula_scheduler_leader", "1 while this scheduler leads", registry=registry),
            pass_seconds=Histogram("nebula_scheduler_pass_seconds",
                                   "Duration of one placement pass (place, then write the difference)",
                                   buckets=PASS_BUCKETS, registry=registry),
            changes=changes,
            rollouts=Counter("nebula_scheduler_rollouts_finished", "Rolling replaces and drain moves this scheduler "
                             "finished, by outcome (done, rolled_back, failed)", ["model", "outcome"],
                             registry=registry),
            fenced=Counter("nebula_scheduler_fenced_passes", "Placement passes refused by the leader fence: this "
                           "scheduler had lost the lead (its lease expired) before it noticed", registry=registry),
        )


class _StateCollector(Collector):
    def __init__(self, state: SchedulerState, clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        st = self._state
        pending = GaugeMetricFamily("nebula_scheduler_pending_models",
                                    "Models with replicas that fit nowhere (leader only)")
        by_model = GaugeMetricFamily("nebula_scheduler_model_pending",
                                     "1 for each model with replicas that fit nowhere (leader only)", labels=["model"])
        nodes = GaugeMetricFamily("nebula_scheduler_nodes", "Live nodes (leader only)")
        gone = GaugeMetricFamily("nebula_scheduler_node_gone_seconds",
                                 "Seconds since each lost node's record vanished; its replicas move after the "
                                 "grace period; the series stays until the node is back (leader only)",
                                 labels=["node"])
        placed = GaugeMetricFamily("nebula_scheduler_placements", "Placements per node (leader only)",
                                   labels=["node"])
        if st.is_leader:
            pending.add_metric([], len(st.pending))
            for model in sorted(st.pending):
                by_model.add_metric([model], 1)
            nodes.add_metric([], len(st.nodes))
            now = self._clock()
            for node, since in sorted(st.gone_since.items()):
                gone.add_metric([node], max(0.0, now - since))
            per_node = Tally(p.node for p in st.placements.values())
            for node in sorted(set(per_node) | set(st.nodes)):
                placed.add_metric([node], per_node.get(node, 0))
        yield from (pending, by_model, nodes, gone, placed)
