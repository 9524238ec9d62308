"""Metric families for the gateway's data path, counted without locks.

prometheus_client takes a lock for every update of every value, so that threads may share a metric. The
gateway's data-path metrics have one thread: a worker's event loop updates them, and a scrape (/metrics, the
console's figures) reads them on that same loop, between two callbacks, so no update is ever half done when
it is read. The lock buys nothing there and costs most of what a request's six updates cost: 3.7 us with
prometheus_client against 0.9 us with these (timeit, on the 2-core box of the README's figures).

The families are exposed through a Collector on the injected registry, with the names, labels, types and
buckets the prometheus_client metrics had (without the `_created` samples, which nothing reads).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# A bound as prometheus_client writes it ("0.01", "1.0"), so that `le` labels stay what they were.
_le: Callable[[float], str] = floatToGoString  # untyped in prometheus_client


class LoopCounter:
    """A counter's value; only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopGauge:
    """A gauge's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class LoopHistogram:
    """A histogram's observations: a count per bucket (not cumulative; the scrape adds them up) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf's
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A bucket counts what is <= its bound: the first bound not below the value.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


C = TypeVar("C", LoopCounter, LoopGauge, LoopHistogram)


class LoopFamily(Generic[C]):
    """One metric's labelled children, each made on first use. Label values must be bounded (known models,
    endpoints, instances), as they must be anyway for the series' sake."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], make: Callable[[], C]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._make: Callable[[], C] = make
        self.children: dict[tuple[str, ...], C] = {}

    def __call__(self, *labels: str) -> C:
        child = self.children.get(labels)
        if child is None:
            if len(labels) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(labels)} label values for {list(self.labelnames)}")
            child = self.children[labels] = self._make()
        return child


class LoopMetrics(Collector):
    """The families made through it, registered as one collector on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters: list[LoopFamily[LoopCounter]] = []
        self._gauges: list[LoopFamily[LoopGauge]] = []
        self._histograms: list[tuple[LoopFamily[LoopHistogram], list[str]]] = []  # with each bucket's `le`
        self._registry = registry

    def counter(self, name: str, doc: str, labelnames: Sequence[str]) -> LoopFamily[LoopCounter]:
        family = LoopFamily(name, doc, labelnames, LoopCounter)
        self._counters.append(family)
        return family

    def gauge(self, name: str, doc: str, labelnames: Sequence[str]) -> LoopFamily[LoopGauge]:
        family = LoopFamily(name, doc, labelnames, LoopGauge)
        self._gauges.append(family)
        return family

    def histogram(self, name: str, doc: str, labelnames: Sequence[str],
                  buckets: Sequence[float]) -> LoopFamily[LoopHistogram]:
        bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))  # +Inf's bucket is always there
        family = LoopFamily(name, doc, labelnames, lambda: LoopHistogram(bounds))
        self._histograms.append((family, [_le(b) for b in bounds] + ["+Inf"]))
        return family

    def register(self) -> None:
        """Expose the families on the registry: once, after all are made (the registry checks their names
        against the other collectors' then)."""
        self._registry.register(self)

    def collect(self) -> Iterator[Metric]:
        return self._exposed(samples=True)

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks names against."""
        return self._exposed(samples=False)

    def _exposed(self, samples: bool) -> Iterator[Metric]:
        for c in self._counters:
            counters = CounterMetricFamily(c.name, c.doc, labels=c.labelnames)
            for labels, counter in c.children.items() if samples else ():
                counters.add_metric(labels, counter.value)
            yield counters
        for g in self._gauges:
            gauges = GaugeMetricFamily(g.name, g.doc, labels=g.labelnames)
            for labels, gauge in g.children.items() if samples else ():
                gauges.add_metric(labels, gauge.value)
            yield gauges
        for h, les in self._histograms:
            histograms = HistogramMetricFamily(h.name, h.doc, labels=h.labelnames)
            for labels, histogram in h.children.items() if samples else ():
                total, buckets = 0, []
                for le, count in zip(les, histogram.counts, strict=True):
                    total += count
                    buckets.append((le, float(total)))
                histograms.add_metric(labels, buckets, histogram.sum)
            yield histograms
