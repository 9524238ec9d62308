"""The console's live figures per model, read from the gateway's own metrics (its registry, in memory).

Counters and histogram buckets go out as totals; the browser turns two successive snapshots into rates
and TTFT quantiles over its own window, so the gateway keeps no history for the console (Grafana does
that). With gateway.workers > 1 these are the figures of the worker the browser is connected to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

_REQUESTS = "nebula_gateway_requests"
_TTFT = "nebula_gateway_ttft_seconds"
_TOKENS = "nebula_gateway_generation_tokens"
_WAITING = "nebula_gateway_engine_waiting_requests"
_RUNNING = "nebula_gateway_engine_running_requests"
_KV = "nebula_gateway_engine_kv_cache_usage"
_WANTED = frozenset({_REQUESTS, _TTFT, _TOKENS, _WAITING, _RUNNING, _KV})


def _entry(out: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    return out.setdefault(model, {"requests": 0.0, "errors": 0.0, "tokens": 0.0, "ttft_buckets": {},
                                  "waiting": 0.0, "running": 0.0, "kv_cache": 0.0})


def model_figures(families: Iterable[Metric]) -> dict[str, dict[str, Any]]:
    """Per model: requests and errors (5xx) so far, generated tokens so far, TTFT histogram buckets
    ({upper bound: count}, cumulative as Prometheus keeps them), and the engines' waiting and running
    requests (summed over replicas) and KV-cache use (the fullest replica's, 0-1)."""
    out: dict[str, dict[str, Any]] = {}
    for family in families:
        if family.name not in _WANTED:
            continue
        for s in family.samples:
            model = s.labels.get("model")
            if not model or model == "unknown":
                continue
            e = _entry(out, model)
            if family.name == _REQUESTS and s.name.endswith("_total"):
                e["requests"] += s.value
                if s.labels.get("status", "").startswith("5"):
                    e["errors"] += s.value
            elif family.name == _TTFT and s.name.endswith("_bucket"):
                le = s.labels["le"]
                bound = "inf" if math.isinf(float(le)) else le
                e["ttft_buckets"][bound] = e["ttft_buckets"].get(bound, 0.0) + s.value
            elif family.name == _TOKENS and s.name.endswith("_total"):
                e["tokens"] += s.value
            elif family.name == _WAITING:
                e["waiting"] += s.value
            elif family.name == _RUNNING:
                e["running"] += s.value
            elif family.name == _KV:
                e["kv_cache"] = max(e["kv_cache"], s.value)
    return out
