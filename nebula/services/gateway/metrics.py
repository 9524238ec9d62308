"""The gateway's request metrics, on an injected registry.

The model label only ever takes names of known models (or "unknown"), so a client cannot grow the
series count by sending made-up model names.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

from nebula.services.gateway.loop_metrics import LoopMetrics

# Inference latency spans milliseconds (embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Time to first token: tens of milliseconds on an idle GPU, tens of seconds behind a long queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
# Gap between streamed tokens: a few ms (small models) to a few hundred (large ones under load).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """The labelled children of one metric, each looked up once and then kept.

    `.labels()` validates, joins and locks on every call, a measurable share of a request's CPU at high
    rates; a dict lookup is not. Label values must be bounded (known models, endpoints, instances), which
    they are anyway for the series' sake, so the cache holds no more than the registry itself.
    """

    def __init__(self, family: M) -> None:
        self._family = family
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._family.labels(*labels)
        return child


class GatewayMetrics:
    """The request series: updated on every request, so counted without locks (loop_metrics.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        families = LoopMetrics(registry)
        self.requests = families.counter(
            "nebula_gateway_requests", "Inference requests by model, endpoint, status.",
            ["model", "endpoint", "status"])
        self.latency = families.histogram(
            "nebula_gateway_request_duration_seconds", "Time from request to the last byte of the response.",
            ["model", "endpoint"], LATENCY_BUCKETS)
        self.ttft = families.histogram(
            "nebula_gateway_ttft_seconds", "Time from request to the first byte of the engine's answer (for a "
            "stream: its first token), chat and completions only.", ["model", "endpoint"], TTFT_BUCKETS)
        self.itl = families.histogram(
            "nebula_gateway_inter_token_latency_seconds", "Mean gap between the streamed events of one response "
            "(one observation per stream).", ["model", "endpoint"], ITL_BUCKETS)
        self.inflight = families.gauge(
            "nebula_gateway_inflight_requests", "Inference requests being served.", ["endpoint"])
        families.register()
        self.connections = ConnectionMetrics(registry)


class ConnectionMetrics:
    """The data-plane server's connection events (its ConnectionEvents, services/http/admission.py) as series:
    what a flood costs shows here, not in the request series, since a refused connection carries no request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._refused = Children(Counter(
            "nebula_gateway_connections_refused", "Client connections refused: max_connections and per_ip closed "
            "at accept, reserve_path answered 503 on a connection over the cap.", ["reason"], registry=registry))
        self._reaped = Counter(
            "nebula_gateway_connections_reaped", "Idle client connections closed to make room at "
            "max_connections.", registry=registry)
        self._cut = Children(Counter(
            "nebula_gateway_connections_cut", "Client connections cut at a deadline: header, body, request, write.",
            ["deadline"], registry=registry))
        self.open = Gauge("nebula_gateway_open_connections", "Client connections open.", registry=registry)

    def refused(self, reason: str) -> None:
        self._refused(reason).inc()

    def reaped(self) -> None:
        self._reaped.inc()

    def cut(self, deadline: str) -> None:
        self._cut(deadline).inc()
