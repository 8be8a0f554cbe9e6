"""Prometheus metrics: one registry per app, so tests can build many apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import Gauge as Gauge  # re-exported for services
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Sample:
    """One value read when /metrics is asked (state another thread keeps)."""

    name: str
    doc: str
    kind: str
    """``gauge`` or ``counter`` (a counter's name gets _total)."""
    labels: dict[str, str]
    value: float


class _Read(Collector):
    def __init__(self, read: Callable[[], list[Sample]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for sample in self._read():
            family = families.get(sample.name)
            if family is None:
                make = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                family = make(sample.name, sample.doc, labels=list(sample.labels))
                families[sample.name] = family
            family.add_metric(list(sample.labels.values()), sample.value)
        yield from families.values()


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The registry of one service, with the HTTP metrics every service has."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request start to the end of the response body.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)

    def collect(self, read: Callable[[], list[Sample]]) -> None:
        """Values read at each scrape from ``read``."""
        self.registry.register(_Read(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
