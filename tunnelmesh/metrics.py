"""Small builders for scrape-time Prometheus collectors.

The node's collectors read plain counters (dicts of label values to numbers) at scrape time; these helpers
turn one such table into a metric family, so each collector is a list of names, help texts and tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (label values, value): one sample of a family.
Sample = tuple[Sequence[str], float]
_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily)


def counter_family(
    name: str, documentation: str, labels: Sequence[str], items: Iterable[Sample]
) -> CounterMetricFamily:
    """A counter family with one sample per item (``labels`` may be empty for a single unlabelled value)."""
    return _filled(CounterMetricFamily(name, documentation, labels=list(labels)), items)


def gauge_family(
    name: str, documentation: str, labels: Sequence[str], items: Iterable[Sample]
) -> GaugeMetricFamily:
    """A gauge family with one sample per item (``labels`` may be empty for a single unlabelled value)."""
    return _filled(GaugeMetricFamily(name, documentation, labels=list(labels)), items)


def _filled(family: _F, items: Iterable[Sample]) -> _F:
    for values, value in items:
        family.add_metric(list(values), value)
    return family


def by_label(table: Mapping[str, float]) -> list[Sample]:
    """A ``{label value: count}`` table as samples of a one-label family, sorted for a stable exposition."""
    return [((k,), n) for k, n in sorted(table.items())]
