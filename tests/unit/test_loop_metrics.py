"""The data path's lock-free metric families (gateway/loop_metrics.py) expose what prometheus_client's own
metrics expose for the same updates: a scrape cannot tell them apart (but for the `_created` samples)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nebula.services.gateway.loop_metrics import LoopMetrics

BUCKETS = (0.01, 0.1, 1, 2.5, 10)
# On a bound (counted in it), between bounds, past the last one, zero and below the first.
OBSERVED = (0.01, 0.05, 0.1, 1.0000001, 2.5, 9.99, 10, 11, 600, 0.0, -1.0)


def _scrape(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_a_scrape_reads_what_prometheus_client_would_have_exposed() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_requests", "Requests.", ["model", "status"], registry=theirs)
    gauge = Gauge("x_inflight", "In flight.", ["endpoint"], registry=theirs)
    histogram = Histogram("x_seconds", "Latency.", ["model"], buckets=BUCKETS, registry=theirs)
    families = LoopMetrics(ours)
    loop_counter = families.counter("x_requests", "Requests.", ["model", "status"])
    loop_gauge = families.gauge("x_inflight", "In flight.", ["endpoint"])
    loop_histogram = families.histogram("x_seconds", "Latency.", ["model"], BUCKETS)
    families.register()

    for model, status in (("a", "200"), ("a", "200"), ("b", "503"), ("a", "404")):
        counter.labels(model, status).inc()
        loop_counter(model, status).inc()
    counter.labels("b", "503").inc(2.5)
    loop_counter("b", "503").inc(2.5)
    for endpoint, up in (("chat", True), ("chat", True), ("embed", True), ("chat", False)):
        (gauge.labels(endpoint).inc if up else gauge.labels(endpoint).dec)()
        (loop_gauge(endpoint).inc if up else loop_gauge(endpoint).dec)()
    for i, value in enumerate(OBSERVED):
        histogram.labels("ab"[i % 2]).observe(value)
        loop_histogram("ab"[i % 2]).observe(value)

    assert _scrape(ours) == _scrape(theirs)
    # model a saw 0.01, 0.1, 2.5 (on its bound), 10, 600 and -1: four are <= 2.5
    assert 'x_seconds_bucket{le="2.5",model="a"} 4.0' in _scrape(ours)


def test_a_child_is_made_once_and_a_wrong_label_count_is_refused() -> None:
    families = LoopMetrics(CollectorRegistry())
    counter = families.counter("y_total_things", "Things.", ["model"])
    assert counter("a") is counter("a") and counter("a") is not counter("b")
    with pytest.raises(ValueError, match="2 label values"):
        counter("a", "b")


def test_the_registry_refuses_a_name_another_collector_has() -> None:
    registry = CollectorRegistry()
    Counter("z_requests", "Requests.", registry=registry)
    families = LoopMetrics(registry)
    families.counter("z_requests", "Requests.", [])
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        families.register()
