"""The operator's own Prometheus metrics (the autoscaler's live in baton.operator.autoscaler)."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "baton_reconcile_seconds", "Time one reconcile of a Model took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
RECONCILES = Counter("baton_reconciles", "Reconciles by outcome (converged, invalid).",
                     ("outcome",))
BUILD_INFO = Gauge("baton_build_info", "Always 1; the running baton version.", ("version",))


def record_build_info() -> None:
    try:
        version = metadata.version("baton")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD_INFO.labels(version).set(1)
