"""The collector builders: a scrape sees what the tables hold, under the names and labels given."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunnelmesh.metrics import by_label, counter_family, gauge_family


class _Tables(Collector):
    def __init__(self) -> None:
        self.dropped: dict[str, int] = {"short": 2, "bad_auth": 1}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield counter_family("t_dropped", "Dropped, by reason", ["reason"], by_label(self.dropped))
        yield counter_family("t_reconnects", "Reconnects", (), [((), 3)])
        yield gauge_family("t_up", "Up, by peer and transport", ["peer", "transport"], [(("p1", "udp"), 1.0)])
        yield gauge_family("t_empty", "No samples yet", ["peer"], [])


def test_families_expose_every_sample_with_its_labels_and_read_the_tables_at_scrape_time() -> None:
    registry = CollectorRegistry()
    tables = _Tables()
    registry.register(tables)
    assert registry.get_sample_value("t_dropped_total", {"reason": "short"}) == 2
    assert registry.get_sample_value("t_dropped_total", {"reason": "bad_auth"}) == 1
    assert registry.get_sample_value("t_reconnects_total") == 3
    assert registry.get_sample_value("t_up", {"peer": "p1", "transport": "udp"}) == 1.0
    text = generate_latest(registry).decode()
    assert "# TYPE t_dropped_total counter" in text and "# TYPE t_up gauge" in text
    assert "# HELP t_empty No samples yet" in text
    tables.dropped["short"] += 1
    assert registry.get_sample_value("t_dropped_total", {"reason": "short"}) == 3


def test_by_label_sorts_for_a_stable_exposition() -> None:
    assert by_label({"b": 2, "a": 1}) == [(("a",), 1), (("b",), 2)]
