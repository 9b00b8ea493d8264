"""Request metrics kept in plain numbers until a flush read exactly as prometheus-client's own
per-request updates would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability import Metrics

# Exactly on a bound, between bounds, zero, beyond the last finite bound.
DURATIONS = (0.0, 0.0004, 0.001, 0.0011, 0.0049, 0.005, 0.02, 0.3, 2.5, 7.0, 61.0, 1000.0)


def samples(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            for sample in metric.samples:
                if not sample.name.endswith("_created"):
                    out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def reference(metrics: Metrics) -> str:
    """What prometheus-client makes of the same observations, one update each."""
    registry = CollectorRegistry()
    buckets = metrics.request_duration._upper_bounds
    requests = Counter("oidc_gateway_requests", "h", ["route", "status", "decision"],
                       registry=registry)
    duration = Histogram("oidc_gateway_request_duration_seconds", "h", ["route"],
                         buckets=buckets, registry=registry)
    upstream = Histogram("oidc_gateway_upstream_duration_seconds", "h", ["route"],
                         buckets=buckets, registry=registry)
    for seconds in DURATIONS:
        requests.labels("app", "2xx", "allowed").inc()
        duration.labels("app").observe(seconds)
        upstream.labels("app").observe(seconds / 2)
    requests.labels("/ping", "2xx", "own").inc()
    duration.labels("/ping").observe(0.0002)
    return generate_latest(registry).decode()


def observe(metrics: Metrics) -> None:
    for seconds in DURATIONS:
        metrics.observe_request("app", 200, "allowed", seconds)
        metrics.observe_upstream("app", seconds / 2)
    metrics.observe_request("/ping", 204, "own", 0.0002)


def test_a_scrape_counts_every_request_as_single_updates_would() -> None:
    metrics = Metrics()
    observe(metrics)
    text = metrics.render().decode()
    expected = reference(metrics)
    for family in ("oidc_gateway_requests", "oidc_gateway_request_duration_seconds",
                   "oidc_gateway_upstream_duration_seconds"):
        assert samples(text, family) == samples(expected, family), family
    assert samples(text, "oidc_gateway_requests")[
        ("oidc_gateway_requests_total", (("decision", "allowed"), ("route", "app"),
                                         ("status", "2xx")))] == len(DURATIONS)


def test_nothing_is_counted_twice_across_flushes() -> None:
    metrics = Metrics()
    observe(metrics)
    metrics.flush()
    metrics.flush()  # nothing new: adds nothing
    text = metrics.render().decode()
    twice = Metrics()
    observe(twice)
    twice.flush()
    observe(twice)
    doubled = samples(twice.render().decode(), "oidc_gateway_request_duration_seconds")
    once = samples(text, "oidc_gateway_request_duration_seconds")
    assert once == samples(reference(metrics), "oidc_gateway_request_duration_seconds")
    assert doubled == {key: value * 2 for key, value in once.items()}


def test_the_in_flight_gauge_is_the_count_of_requests_being_answered() -> None:
    metrics = Metrics()
    metrics.answering = 3
    gauge = samples(metrics.render().decode(), "oidc_gateway_requests_in_flight")
    assert gauge == {("oidc_gateway_requests_in_flight", ()): 3.0}
    metrics.answering = 0
    gauge = samples(metrics.render().decode(), "oidc_gateway_requests_in_flight")
    assert gauge == {("oidc_gateway_requests_in_flight", ()): 0.0}
