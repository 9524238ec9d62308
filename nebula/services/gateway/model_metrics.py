"""Per-model aggregates on the gateway's /metrics, computed at scrape time from its mirrors.

Replicas wanted and ready per model (a loaded model with no ready replica has a 0 here, where the table's
phase counts have no series at all), and the tokens the engines counted, per model (load.py's TokenBook:
read from the engines' /metrics by the load poll, never from the request path).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.view import ClusterView


class ModelCollector(Collector):
    def __init__(self, view: ClusterView, table: ReplicaTable) -> None:
        self._view = view
        self._table = table

    def collect(self) -> Iterator[Metric]:
        desired = GaugeMetricFamily("nebula_gateway_model_replicas_desired",
                                    "Replicas each loaded model should have now (its spec; an elastic "
                                    "model's: the scheduler's count).", labels=["model"])
        ready = GaugeMetricFamily("nebula_gateway_model_replicas_ready",
                                  "Ready replicas of each model, as this gateway routes to them.", labels=["model"])
        models = dict(self._view.models)
        routable = self._table.ready()
        for model in sorted(set(models) | set(routable)):
            if model in models:
                desired.add_metric([model], self._view.desired_replicas(models[model]))
            ready.add_metric([model], len(routable.get(model, ())))
        yield desired
        yield ready
        tokens = self._table.loads.tokens
        prompt = CounterMetricFamily("nebula_gateway_prompt_tokens",
                                     "Prompt tokens the engines of each model processed (from their "
                                     "vllm:prompt_tokens_total, since this gateway first saw them).", labels=["model"])
        generation = CounterMetricFamily("nebula_gateway_generation_tokens",
                                         "Tokens the engines of each model generated (from their "
                                         "vllm:generation_tokens_total, since this gateway first saw them).",
                                         labels=["model"])
        for model, n in sorted(tokens.prompt.items()):
            prompt.add_metric([model], n)
        for model, n in sorted(tokens.generation.items()):
            generation.add_metric([model], n)
        yield prompt
        yield generation
