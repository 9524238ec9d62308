"""Tokens per model at the gateway, from the engines' own counters (parsing, delta counting, attribution
to models, the per-model gauges on /metrics). The poll itself is test_engine_metrics'."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nebula.adapters.engine_metrics import parse_engine_load
from nebula.core import keys, records
from nebula.core.elastic import ScaleState, ScalingPolicy
from nebula.core.engine_load import EngineLoad
from nebula.core.model import InstanceStatus, ModelSpec, Phase, dumps
from nebula.core.store import KeyValue
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.load import LoadBook, TokenBook, counter_increase
from nebula.services.gateway.model_metrics import ModelCollector
from nebula.services.gateway.replicas import ReplicaTable
from nebula.services.gateway.view import ClusterView
from tests.harness.mirrors import mirrored
from tests.unit.fake_engine import vllm_metrics_text

COUNTERS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="chat"} 1.0
vllm:num_requests_running{engine="1",model_name="chat"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="chat"} 100.0
vllm:prompt_tokens_total{engine="1",model_name="chat"} 20.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="chat"} 1.7e+09
# HELP vllm:prompt_tokens_by_source_total Prefill tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="chat",source="local"} 999.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="chat"} 7.0
vllm:generation_tokens_total{engine="1",model_name="chat"} 3.0
"""


def load(prompt: float | None, generation: float | None) -> EngineLoad:
    return EngineLoad(prompt_tokens=prompt, generation_tokens=generation)


# --- parsing ---------------------------------------------------------------------------------------------

def test_token_counters_are_summed_over_label_sets_and_longer_names_ignored() -> None:
    got = parse_engine_load(COUNTERS)
    assert (got.prompt_tokens, got.generation_tokens) == (120.0, 10.0)
    assert got == EngineLoad(running=3.0)  # the counters are no part of the load


def test_a_vllm_exposition_as_vllm_writes_it_gives_its_prompt_counter() -> None:
    got = parse_engine_load(vllm_metrics_text("m", engines=("0", "1")))
    assert got.prompt_tokens == 2 * 913.0
    assert got.generation_tokens is None  # not in that exposition: unknown, not zero


# --- counting --------------------------------------------------------------------------------------------

def test_counter_increase_is_never_negative() -> None:
    assert counter_increase(10, 15) == 5
    assert counter_increase(10, 10) == 0
    assert counter_increase(500, 30) == 30  # the engine restarted: its counter began again at zero


def test_first_reading_is_a_baseline_then_increases_add_up() -> None:
    book = TokenBook()
    book.observe("http://a", "chat", load(1000, 50))
    assert (book.prompt, book.generation) == ({"chat": 0.0}, {"chat": 0.0})
    book.observe("http://a", "chat", load(1010, 52))
    book.observe("http://b", "chat", load(7, 7))  # a second replica: its own baseline
    book.observe("http://b", "chat", load(9, 10))
    assert (book.prompt, book.generation) == ({"chat": 12.0}, {"chat": 5.0})


def test_an_engine_restart_counts_its_new_tokens_and_never_subtracts() -> None:
    book = TokenBook()
    book.observe("http://a", "chat", load(1000, 100))
    book.observe("http://a", "chat", load(1005, 101))
    book.observe("http://a", "chat", load(3, 2))  # restarted: 3 and 2 tokens since
    assert (book.prompt["chat"], book.generation["chat"]) == (8.0, 3.0)
    book.observe("http://a", "chat", load(4, 2))
    assert (book.prompt["chat"], book.generation["chat"]) == (9.0, 3.0)


def test_a_port_that_serves_another_model_starts_from_a_baseline() -> None:
    book = TokenBook()
    book.observe("http://a", "chat", load(100, 10))
    book.observe("http://a", "chat", load(110, 12))
    book.observe("http://a", "other", load(500, 50))  # the port was handed to another model
    book.observe("http://a", "other", load(501, 52))
    assert book.prompt == {"chat": 10.0, "other": 1.0}
    assert book.generation == {"chat": 2.0, "other": 2.0}


def test_a_missing_counter_counts_nothing_and_keeps_the_other() -> None:
    book = TokenBook()
    book.observe("http://a", "chat", load(None, 10))
    book.observe("http://a", "chat", load(None, 15))
    assert book.prompt == {}
    assert book.generation == {"chat": 5.0}


# --- attribution through the replica table, and /metrics -------------------------------------------------

def kvs(*statuses: InstanceStatus) -> MirrorState[InstanceStatus]:
    return mirrored(records.INSTANCES, {keys.instance_key(s.instance): KeyValue(keys.instance_key(s.instance),
                                                                                dumps(s.to_dict()), 1, 1)
                                        for s in statuses})


def ready(instance: str, model: str, endpoint: str, phase: Phase = Phase.READY) -> InstanceStatus:
    return InstanceStatus(instance=instance, model=model, node="n1", phase=phase, endpoint=endpoint)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_gateway_metrics_show_tokens_and_replicas_per_model() -> None:
    book = LoadBook(max_age_s=3.0)
    table, view = ReplicaTable(loads=book), ClusterView()
    view.update_models(mirrored(records.MODELS, {keys.model_key(n): KeyValue(keys.model_key(n), dumps(ModelSpec(
        name=n, source="/m", replicas=r).to_dict()), 1, 1) for n, r in (("chat", 2), ("idle", 1))}))
    table.update(kvs(ready("chat", "chat", "http://a"), ready("chat:1", "chat", "http://b", Phase.STARTING)))
    registry = CollectorRegistry()
    registry.register(ModelCollector(view, table))

    book.record("http://a", load(100, 10), now=1.0)
    book.record("http://a", load(140, 25), now=2.0)
    book.record("http://z", load(5, 5), now=2.0)  # no replica of any model: not attributed
    got = samples(registry)
    assert got[("nebula_gateway_prompt_tokens_total", (("model", "chat"),))] == 40.0
    assert got[("nebula_gateway_generation_tokens_total", (("model", "chat"),))] == 15.0
    assert got[("nebula_gateway_model_replicas_desired", (("model", "chat"),))] == 2
    assert got[("nebula_gateway_model_replicas_ready", (("model", "chat"),))] == 1
    assert got[("nebula_gateway_model_replicas_desired", (("model", "idle"),))] == 1
    assert got[("nebula_gateway_model_replicas_ready", (("model", "idle"),))] == 0  # the "no ready replica" signal
    assert not any(labels == (("model", "idle"),) for name, labels in got if "tokens" in name)

    # The replica leaves READY, then comes back restarted: the counter goes on from where it was.
    table.update(kvs(ready("chat", "chat", "http://a", Phase.STARTING)))
    table.update(kvs(ready("chat", "chat", "http://a")))
    book.record("http://a", load(6, 4), now=9.0)
    got = samples(registry)
    assert got[("nebula_gateway_prompt_tokens_total", (("model", "chat"),))] == 46.0
    assert got[("nebula_gateway_generation_tokens_total", (("model", "chat"),))] == 19.0


def test_an_elastic_models_desired_replicas_are_the_schedulers_count() -> None:
    """At zero (idle) an elastic model wants 0 replicas, not its spec's count: the gauge and GET /v1/models say
    what the scheduler set; before its first word, the spec's count."""
    table, view = ReplicaTable(loads=LoadBook(max_age_s=3.0)), ClusterView()
    specs = {"lazy": ModelSpec(name="lazy", source="/m", replicas=1,
                               scaling=ScalingPolicy(min_replicas=0, max_replicas=3, idle_unload_s=60)),
             "fresh": ModelSpec(name="fresh", source="/m", replicas=2,
                                scaling=ScalingPolicy(min_replicas=1, max_replicas=3))}
    view.update_models(mirrored(records.MODELS, {
        keys.model_key(n): KeyValue(keys.model_key(n), dumps(s.to_dict()), 1, 1) for n, s in specs.items()}))
    idle = ScaleState(model="lazy", replicas=0, reason="idle for 60 s")
    view.update_scale(mirrored(records.SCALE, {keys.scale_key("lazy"): KeyValue(
        keys.scale_key("lazy"), dumps(idle.to_dict()), 1, 1)}))
    registry = CollectorRegistry()
    registry.register(ModelCollector(view, table))
    got = samples(registry)
    assert got[("nebula_gateway_model_replicas_desired", (("model", "lazy"),))] == 0
    assert got[("nebula_gateway_model_replicas_desired", (("model", "fresh"),))] == 2
    assert view.model_entry(specs["lazy"], Counter())["replicas"] == 0
