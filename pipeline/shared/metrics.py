"""/metrics of `run`, `bridge` and `worker`, through prometheus-client.

Every figure is computed when scraped, from the counters the runtimes keep anyway (updated once
per batch): each runtime, and each part with figures of its own (CloseFigures, PushDispatcher,
ReloadStats, InfluxSink), is a prometheus-client *Collector* whose ``collect()`` yields metric
families. Nothing on the hot path touches a metric object.

    registry = collecting(rt)          # the runtime's own CollectorRegistry, rt.collect() on scrape
    text(registry)                     # the Prometheus text format
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

TIERS = ("city", "district", "street", "dept", "grid", "owner", "community")


def _family(cls: type, name: str, help_: str, value: float | Mapping[str, float],
            label: str) -> Metric:
    if isinstance(value, Mapping):
        f = cls(name, help_, labels=[label])
        for k, v in value.items():
            f.add_metric([str(k)], v)
        return f
    return cls(name, help_, value=value)


def counter(name: str, help_: str, value: float | Mapping[str, float], label: str = "") -> Metric:
    """A counter (``name`` ends in _total): one value, or one sample per ``label`` value."""
    return _family(CounterMetricFamily, name, help_, value, label)


def gauge(name: str, help_: str, value: float | Mapping[str, float], label: str = "") -> Metric:
    return _family(GaugeMetricFamily, name, help_, value, label)


def notices_by_tier(counters: Mapping[str, int], what: str = "published") -> Metric:
    """From counters keyed `notices.{tier}`: the same family in every runtime."""
    return counter("cityops_notices_total", f"Notices {what}, by tier.",
                   {t: counters.get("notices." + t, 0) for t in TIERS}, "tier")


def dead_letters(counters: Mapping[str, int]) -> Metric:
    """From counters keyed `dead.{reason}`."""
    return counter("cityops_dead_letters_total", "Input refused, by reason.",
                   {k[5:]: counters[k] for k in sorted(counters) if k.startswith("dead.")},
                   "reason")


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def collecting(collector: Collector) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) around one collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def text(source: CollectorRegistry | Collector | Iterable[Metric]) -> str:
    """The Prometheus text format of a registry, a collector or some families."""
    if not isinstance(source, CollectorRegistry):
        source = collecting(source if hasattr(source, "collect") else _Families(source))
    return generate_latest(source).decode()
