"""baton.workers.metrics: names, labels, buckets, stats read at scrape time, /metrics over HTTP."""

from __future__ import annotations

import dataclasses
import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.workers import metrics as m

LABELS = {"namespace": "llm", "model": "nano", "role": "decode", "pool": "hopper"}


def _samples(exposition: bytes) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _key(name: str, **extra: str) -> tuple[str, frozenset]:
    return (name, frozenset({**LABELS, **extra}.items()))


def test_buckets_are_geometric_and_hold_round_targets():
    b = m.LATENCY_BUCKETS
    ratios = [hi / lo for lo, hi in zip(b, b[1:])]
    assert all(1.2 < r < 1.3 for r in ratios), ratios
    for target in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 600.0 / 1.2):
        nearest = min(b, key=lambda e: abs(math.log(e / target)))
        assert abs(math.log(nearest / target)) <= math.log(1.27) / 2 + 1e-9, (target, nearest)
    for target in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        assert target in b


def test_worker_series_from_stats_at_scrape_time():
    state = {"stats": m.WorkerStats(3, 2, 0.5, 0.25, 100, 40, 9, 7)}
    metrics = m.BatonMetrics(m.MetricLabels(**LABELS), stats=lambda: state["stats"])
    metrics.time_to_first_token.observe(0.3)
    metrics.inter_token_latency.observe(0.02)
    metrics.request_finished("success")
    metrics.state_transfer_bytes("ssm", 4096)
    metrics.state_transfer_bytes("kv", 100)
    metrics.state_transfer_failures.inc()
    s = _samples(metrics.exposition())
    assert s[_key("baton_requests_waiting")] == 3
    assert s[_key("baton_kv_cache_usage_ratio")] == 0.5
    assert s[_key("baton_ssm_state_slots_usage_ratio")] == 0.25
    assert s[_key("baton_prompt_tokens_total")] == 100
    assert s[_key("baton_spec_decode_accepted_tokens_total")] == 7
    assert s[_key("baton_requests_total", outcome="success")] == 1
    assert s[_key("baton_requests_total", outcome="timeout")] == 0
    assert s[_key("baton_state_transfer_bytes_total", kind="ssm")] == 4096
    assert s[_key("baton_state_transfer_bytes_total", kind="conv")] == 0
    assert s[_key("baton_state_transfer_failures_total")] == 1
    assert s[_key("baton_time_to_first_token_seconds_bucket", le="0.315")] == 1
    assert s[_key("baton_time_to_first_token_seconds_bucket", le="0.25")] == 0
    # The next scrape sees the engine's new state, not a cached one.
    state["stats"] = dataclasses.replace(state["stats"], kv_cache_usage_ratio=0.0)
    assert _samples(metrics.exposition())[_key("baton_kv_cache_usage_ratio")] == 0.0
    with pytest.raises(AttributeError, match="stats"):
        metrics.requests_waiting.set(1)


def test_router_sets_series_directly():
    labels = dict(LABELS, role="router", pool="")
    metrics = m.BatonMetrics(m.MetricLabels(**labels))
    metrics.requests_waiting.set(4)
    metrics.prompt_tokens_total.inc(12)
    s = _samples(metrics.exposition())
    assert s[("baton_requests_waiting", frozenset(labels.items()))] == 4
    assert s[("baton_prompt_tokens_total", frozenset(labels.items()))] == 12


def test_bad_values_are_named():
    metrics = m.BatonMetrics(m.MetricLabels(**LABELS))
    with pytest.raises(ValueError, match="outcome='fine'"):
        metrics.request_finished("fine")
    with pytest.raises(ValueError, match="kind='weights'"):
        metrics.state_transfer_bytes("weights", 1)
    with pytest.raises(ValueError, match="role='gpu'"):
        m.MetricLabels("ns", "x", "gpu")
    with pytest.raises(ValueError, match="model"):
        m.MetricLabels("ns", "", "decode")


def test_stats_fields_match_exported_series():
    names = [f.name for f in dataclasses.fields(m.WorkerStats)]
    assert names == list(m._STATS_SERIES)


def test_metrics_server_serves_http():
    stats = m.WorkerStats(0, 1, 0, 0, 0, 0)
    metrics = m.BatonMetrics(m.MetricLabels(**LABELS), stats=lambda: stats)
    server = m.MetricsServer(metrics, 0, host="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read()
    finally:
        server.close()
    assert _samples(body)[_key("baton_requests_running")] == 1
