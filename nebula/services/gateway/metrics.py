"""The gateway's Prometheus metrics, on an injected registry.

The model label only ever takes names of known models (or "unknown"), so a client cannot grow the
series count by sending made-up model names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Inference latency spans milliseconds (embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("nebula_gateway_requests", "Inference requests by model, endpoint, status.",
                                ["model", "endpoint", "status"], registry=registry)
        self.latency = Histogram("nebula_gateway_request_duration_seconds",
                                 "Time from request to the last byte of the response.",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inflight = Gauge("nebula_gateway_inflight_requests", "Inference requests being served.",
                              ["endpoint"], registry=registry)
