"""The gateway's routing metrics (picks, retries, the replica table, engine load), on an injected registry.

Gauges of the table (in flight per replica, instances by phase, the engines' polled load) are computed at
scrape time from the table itself, so there is no second copy to keep in step and no stale series for a
replica that left.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.core.model import Phase
from nebula.services.gateway.load import Clock
from nebula.services.gateway.loop_metrics import LoopMetrics
from nebula.services.gateway.replicas import ReplicaTable


class _TableCollector(Collector):
    def __init__(self, table: ReplicaTable, clock: Clock) -> None:
        self._table = table
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        # Not nebula_gateway_inflight_requests: that one counts client requests by endpoint (metrics.py).
        # Replicas by instance name, never by address: /metrics needs no key, and engines have no
        # authentication of their own; the engines' addresses are the admin-only SD endpoint's
        # (/v1/admin/prometheus/sd).
        inflight = GaugeMetricFamily("nebula_gateway_replica_inflight",
                                     "Requests this gateway has in flight to each replica.",
                                     labels=["model", "instance"])
        for model, replicas in sorted(self._table.ready().items()):
            for r in replicas:
                inflight.add_metric([model, r.instance], self._table.inflight(r.endpoint))
        yield inflight
        yield GaugeMetricFamily("nebula_gateway_draining_inflight",
                                "Requests still finishing on replicas that are no longer ready.",
                                value=sum(self._table.draining_inflight().values()))
        phases = GaugeMetricFamily("nebula_gateway_replicas", "Instances of each model by phase.",
                                   labels=["model", "phase"])
        for model, counts in sorted(self._table.phases().items()):
            for phase in Phase:
                phases.add_metric([model, phase.value], counts.get(phase, 0))
        yield phases
        yield from self._engine_load()

    def _engine_load(self) -> Iterator[Metric]:
        """The last polled load of each READY replica that has one (a replica never polled has no series)."""
        labels = ["model", "replica"]
        waiting = GaugeMetricFamily("nebula_gateway_engine_waiting_requests",
                                    "Requests queued in each replica's engine, as last polled.", labels=labels)
        running = GaugeMetricFamily("nebula_gateway_engine_running_requests",
                                    "Requests running in each replica's engine, as last polled.", labels=labels)
        kv = GaugeMetricFamily("nebula_gateway_engine_kv_cache_usage",
                               "KV cache usage (0-1) of each replica's engine, as last polled.", labels=labels)
        age = GaugeMetricFamily("nebula_gateway_engine_load_age_seconds",
                                "Age of the last load sample of each replica.", labels=labels)
        now = self._clock()
        for model, replicas in sorted(self._table.ready().items()):
            for r in replicas:
                sample = self._table.loads.sample(r.endpoint)
                if sample is None:
                    continue
                waiting.add_metric([model, r.instance], sample.load.waiting)
                running.add_metric([model, r.instance], sample.load.running)
                kv.add_metric([model, r.instance], sample.load.kv_cache_usage)
                age.add_metric([model, r.instance], max(0.0, now - sample.at))
        yield from (waiting, running, kv, age)
        yield CounterMetricFamily("nebula_gateway_load_poll_failures",
                                  "Engine /metrics polls that failed or timed out.",
                                  value=self._table.loads.failures)


class RoutingMetrics:
    """Counters of the forwarding path (the table's gauges are computed at scrape time, above)."""

    def __init__(self, registry: CollectorRegistry, table: ReplicaTable, clock: Clock) -> None:
        families = LoopMetrics(registry)  # the picks count on every request: without locks (loop_metrics.py)
        self.picks = families.counter("nebula_gateway_picks", "Replica picks (one per attempt).", ["model", "instance"])
        self.retries = families.counter("nebula_gateway_retries", "Attempts retried on another replica, by reason.",
                                        ["model", "reason"])
        self.no_replica = families.counter("nebula_gateway_no_replica", "Requests answered 503: no replica for them.",
                                           ["model"])
        families.register()
        registry.register(_TableCollector(table, clock))
