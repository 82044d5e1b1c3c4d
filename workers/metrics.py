"""Prometheus metrics of every baton process (DESIGN.md, Metrics), defined once.

Names follow the Prometheus guide: prefix baton_, base units, _total counters, ratios 0..1.
Every series carries the labels namespace, model (the Model's metadata.name), role (prefill,
decode or router) and pool (the GPU pool; empty for the router).

Two kinds of numbers live here:

- Events, recorded as they happen by whoever sees them: latency histograms (time to first
  token, inter-token latency, request duration, state-transfer seconds), requests by outcome,
  state-transfer bytes by kind (counted by the sender only) and transfer failures.
- Engine state (queue lengths, cache usage, token counters, speculative-decoding counters):
  a worker hands `BatonMetrics` a callable returning a `WorkerStats` and the exporter reads it
  at every scrape, so /metrics is never staler than the engine. A process without an engine
  (the router) passes no callable and sets the same series directly.

The router's time-to-first-token and inter-token-latency histograms (role="router") are the
SLO metrics the autoscaler reads; the workers' are for diagnosis. All latency histograms share
LATENCY_BUCKETS so targets compare across roles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

LABEL_NAMES = ("namespace", "model", "role", "pool")
ROLES = ("prefill", "decode", "router")
OUTCOMES = ("success", "error", "cancelled", "timeout", "rejected")
STATE_KINDS = ("kv", "conv", "ssm", "mtp_kv", "hidden")

# The Renard R10 series (ten steps per decade, ratio ~1.26) from 1 ms to 630 s: geometric, and
# every round target (0.05 s, 0.1 s, 0.2 s, 0.25 s, 0.5 s, 1 s, 2 s, 2.5 s, 4 s, 5 s ...) is an
# edge, so attainment at a target is read from one bucket without interpolation.
_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 6) for e in range(-3, 3) for m in _R10 if m * 10.0**e <= 630.0
)


@dataclass(frozen=True)
class MetricLabels:
    """The identity every series of one process carries."""

    namespace: str
    model: str
    role: str
    pool: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} is not one of {', '.join(ROLES)}")
        for name in ("namespace", "model"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")

    def values(self) -> tuple[str, str, str, str]:
        return (self.namespace, self.model, self.role, self.pool)


@dataclass(frozen=True)
class WorkerStats:
    """Engine state read at scrape time (a worker maps its EngineStats onto this)."""

    # Requests admitted but not running yet (decode: reserved, waiting for their state).
    requests_waiting: int
    # Requests being executed.
    requests_running: int
    # Share of KV cache pages in use, 0..1.
    kv_cache_usage_ratio: float
    # Share of Mamba state slots in use, 0..1.
    ssm_state_slots_usage_ratio: float
    # Monotonic counters since the process started.
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_decode_draft_tokens_total: int = 0
    spec_decode_accepted_tokens_total: int = 0
    # Prefix cache (both roles): prompt tokens looked up, and those served from the cache.
    prefix_cache_queried_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    # Share of the Mamba snapshot pool in use, 0..1.
    prefix_cache_snapshot_usage_ratio: float = 0.0
    prefix_cache_snapshot_evictions_total: int = 0
    prefix_cache_page_evictions_total: int = 0
    # Decode: reservations whose uncached rest this worker prefilled itself.
    local_prefills_total: int = 0


# name -> (help, is_counter); the series WorkerStats feeds, in its field order.
_STATS_SERIES: dict[str, tuple[str, bool]] = {
    "requests_waiting": ("Requests admitted and waiting to run.", False),
    "requests_running": ("Requests being executed.", False),
    "kv_cache_usage_ratio": ("Share of KV cache pages in use.", False),
    "ssm_state_slots_usage_ratio": ("Share of Mamba state slots in use.", False),
    "prompt_tokens_total": ("Prompt tokens processed.", True),
    "generation_tokens_total": ("Tokens generated.", True),
    "spec_decode_draft_tokens_total": ("Speculative draft tokens proposed.", True),
    "spec_decode_accepted_tokens_total": ("Speculative draft tokens accepted.", True),
    "prefix_cache_queried_tokens_total": ("Prompt tokens looked up in the prefix cache.", True),
    "prefix_cache_hit_tokens_total": (
        "Prompt tokens served from the prefix cache (KV and a Mamba snapshot) instead of "
        "computed.", True),
    "prefix_cache_snapshot_usage_ratio": ("Share of the Mamba snapshot pool in use.", False),
    "prefix_cache_snapshot_evictions_total": ("Mamba snapshots evicted for new ones.", True),
    "prefix_cache_page_evictions_total": ("Cached KV pages reused for fresh ones.", True),
    "local_prefills_total": (
        "Reservations whose uncached rest the decode worker prefilled itself (no transfer).",
        True),
}


class _StatsCollector(Collector):
    """Turns a WorkerStats snapshot into metric families at every scrape."""

    def __init__(self, labels: MetricLabels, read_stats: Callable[[], WorkerStats]):
        self._labels = labels
        self._read_stats = read_stats

    def describe(self) -> Iterable:
        return self._families(None)

    def collect(self) -> Iterable:
        return self._families(self._read_stats())

    def _families(self, stats: WorkerStats | None) -> list:
        families = []
        for name, (doc, is_counter) in _STATS_SERIES.items():
            value = 0.0 if stats is None else float(getattr(stats, name))
            if is_counter:
                family = CounterMetricFamily(f"baton_{name.removesuffix('_total')}", doc,
                                             labels=LABEL_NAMES)
            else:
                family = GaugeMetricFamily(f"baton_{name}", doc, labels=LABEL_NAMES)
            family.add_metric(self._labels.values(), value)
            families.append(family)
        return families


class BatonMetrics:
    """Every baton_* series of one process, bound to its labels.

    Workers: `BatonMetrics(labels, stats=engine_stats_fn)`; engine-state series are read from
    it at scrape time. Router: `BatonMetrics(labels)`, then set `requests_waiting`,
    `requests_running`, ... directly (they are then plain gauges and counters).
    """

    def __init__(self, labels: MetricLabels, registry: CollectorRegistry | None = None,
                 stats: Callable[[], WorkerStats] | None = None):
        self.labels = labels
        self.registry = registry if registry is not None else CollectorRegistry()
        values = labels.values()

        def histogram(name: str, doc: str) -> Histogram:
            family = Histogram(name, doc, LABEL_NAMES, registry=self.registry,
                               buckets=LATENCY_BUCKETS)
            return family.labels(*values)

        self.time_to_first_token = histogram(
            "baton_time_to_first_token_seconds", "Arrival to first token of a request.")
        self.inter_token_latency = histogram(
            "baton_inter_token_latency_seconds", "Gap between consecutive output tokens.")
        self.request_duration = histogram(
            "baton_request_duration_seconds", "Arrival to last token of a request.")
        self.state_transfer_seconds = histogram(
            "baton_state_transfer_seconds", "Duration of one request's state transfer.")
        self._requests = Counter("baton_requests", "Requests finished, by outcome.",
                                 LABEL_NAMES + ("outcome",), registry=self.registry)
        for outcome in OUTCOMES:  # every outcome exists from the start, so rate() sees zeros
            self._requests.labels(*values, outcome)
        self._transfer_bytes = Counter(
            "baton_state_transfer_bytes", "State bytes sent to decode workers, by state kind.",
            LABEL_NAMES + ("kind",), registry=self.registry)
        for kind in STATE_KINDS:
            self._transfer_bytes.labels(*values, kind)
        self._saved_bytes = Counter(
            "baton_state_transfer_saved_bytes",
            "State bytes a decode worker's prefix cache kept off the wire (its cached prefix, "
            "or a whole local prefill), by state kind.",
            LABEL_NAMES + ("kind",), registry=self.registry)
        for kind in STATE_KINDS:
            self._saved_bytes.labels(*values, kind)
        self.state_transfer_failures = Counter(
            "baton_state_transfer_failures", "State transfers that failed (either side).",
            LABEL_NAMES, registry=self.registry).labels(*values)
        self.grammar_refused_tokens = Counter(
            "baton_grammar_refused_tokens", "Choices that ended in an error because the output "
            "grammar refused the token the model sampled (a grammar that does not fit the "
            "tokenizer).", LABEL_NAMES, registry=self.registry).labels(*values)

        self._stats_pulled = stats is not None
        if stats is not None:
            self.registry.register(_StatsCollector(labels, stats))
        else:
            for name, (doc, is_counter) in _STATS_SERIES.items():
                if is_counter:
                    metric = Counter(f"baton_{name.removesuffix('_total')}", doc, LABEL_NAMES,
                                     registry=self.registry)
                else:
                    metric = Gauge(f"baton_{name}", doc, LABEL_NAMES, registry=self.registry)
                setattr(self, name, metric.labels(*values))

    def __getattr__(self, name: str):
        # Only reached for attributes that were not set: the engine-state series of a worker.
        if name in _STATS_SERIES:
            raise AttributeError(f"{name} is read from the engine's stats at scrape time; "
                                 "this BatonMetrics was given a stats callable")
        raise AttributeError(name)

    def request_finished(self, outcome: str) -> None:
        """Counts one finished request under outcome (success|error|cancelled|timeout|rejected)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome={outcome!r} is not one of {', '.join(OUTCOMES)}")
        self._requests.labels(*self.labels.values(), outcome).inc()

    def state_transfer_bytes(self, kind: str, nbytes: int) -> None:
        """Counts state bytes sent (sender side only) under kind (kv|conv|ssm|mtp_kv|hidden)."""
        self._count_bytes(self._transfer_bytes, kind, nbytes)

    def state_transfer_saved_bytes(self, kind: str, nbytes: int) -> None:
        """Counts state bytes a prefix-cache hit kept off the wire (decode side) under kind."""
        self._count_bytes(self._saved_bytes, kind, nbytes)

    def _count_bytes(self, counter: Counter, kind: str, nbytes: int) -> None:
        if kind not in STATE_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(STATE_KINDS)}")
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        counter.labels(*self.labels.values(), kind).inc(nbytes)

    def exposition(self) -> bytes:
        """The text exposition format of every series (what /metrics serves)."""
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics of one registry over HTTP on a background thread."""

    def __init__(self, metrics: BatonMetrics, port: int, host: str = "0.0.0.0"):
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port={port} is not in 0..65535")
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = self._server.server_address[1]
        self._closed = threading.Event()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
