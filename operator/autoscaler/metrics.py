"""What the autoscaler reads from Prometheus, as PromQL, turned into a policy Observation.

Series (DESIGN.md, Metrics; labels namespace, model, role, pool):
- the router's client-visible histograms (role="router") are the SLO metrics:
  baton_time_to_first_token_seconds and baton_inter_token_latency_seconds. Attainment at a
  target is the share of observations in buckets up to the target; the buckets have an
  edge at every round target, and between edges the share is interpolated linearly.
- prompt tokens/s from the prefill workers' baton_prompt_tokens_total, generated tokens/s
  from the decode workers' baton_generation_tokens_total (each token counted by one role).
- queued requests: baton_requests_waiting of the router and the prefill workers (prefill),
  of the decode workers (decode); running sequences: decode's baton_requests_running.
- arrivals: requests reaching the routers per second, the leading signal. A router counts a
  request in baton_requests_running from its arrival to its end and in baton_requests_total
  at its end, so arrivals = finished + growth of those in flight:
  rate(requests_total{outcome!="rejected"}) + delta(requests_running) / window. A request the
  router refused (outcome "rejected": a 4xx, or a 503 without a ready worker) is not load the
  workers see: a flood of malformed requests must not grow the fleet. (The router counts a
  429 from a full admission queue as "rejected" too; that overload still shows as queued
  requests and missed targets.) The same arrivals over a short window of two scrapes beside
  the rate window are the ramp detector's input (baton.operator.autoscaler.trend.onset_slope).

A series that is absent (the router or a role's workers export nothing yet) is
MissingSeries: the autoscaler holds its last decision rather than read "no load".
"""

from __future__ import annotations

import asyncio
import math

from baton.operator.autoscaler.policy import Observation
from baton.operator.autoscaler.prometheus import (
    MissingSeries,
    PrometheusClient,
    PrometheusQueryError,
    Sample,
)

__all__ = ["selector", "attainment_from_buckets", "read_observation", "read_pod_load"]

TTFT = "baton_time_to_first_token_seconds"
ITL = "baton_inter_token_latency_seconds"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(namespace: str, model: str, role: str, pool: str | None = None) -> str:
    """A label matcher for one Model's series of one role ("a|b" matches either role)."""
    op = "=~" if "|" in role else "="
    parts = [f"namespace={_quote(namespace)}", f"model={_quote(model)}", f"role{op}{_quote(role)}"]
    if pool is not None:
        parts.append(f"pool={_quote(pool)}")
    return "{" + ",".join(parts) + "}"


def attainment_from_buckets(buckets: list[tuple[float, float]], target: float) -> float | None:
    """Share of observations <= target from cumulative (le, count) pairs (any order, +Inf
    included); None when there are no observations. Linear between bucket edges."""
    if not buckets:
        raise ValueError("attainment needs at least the +Inf bucket")
    ordered = sorted(buckets)
    total = ordered[-1][1]
    if not math.isinf(ordered[-1][0]):
        raise ValueError(f"the last bucket must be +Inf, got le={ordered[-1][0]}")
    if total <= 0:
        return None
    below_le, below_count = 0.0, 0.0
    for le, count in ordered:
        if le == target:
            return min(1.0, count / total)
        if le > target:
            if math.isinf(le):
                return min(1.0, below_count / total)
            share = (target - below_le) / (le - below_le)
            return min(1.0, (below_count + share * (count - below_count)) / total)
        below_le, below_count = le, count
    return min(1.0, below_count / total)


def _buckets(samples: list[Sample]) -> list[tuple[float, float]]:
    out = []
    for s in samples:
        le = s.labels.get("le")
        if le is None:
            continue
        out.append((float(le), s.value))
    return out


async def read_observation(prom: PrometheusClient, namespace: str, model: str, *,
                           ttft_target: float, itl_target: float,
                           window_seconds: int,
                           short_window_seconds: int | None = None) -> Observation:
    """One Observation from Prometheus; MissingSeries when a needed series is absent, other
    PrometheusErrors when Prometheus is down or rejects a query. short_window_seconds: also
    read the arrivals over this shorter window (None or not shorter: not read)."""
    w = f"[{int(window_seconds)}s]"
    router = selector(namespace, model, "router")
    admitted = router[:-1] + ',outcome!="rejected"}'
    queries = {
        "ttft": f"sum by (le) (rate({TTFT}_bucket{router}{w}))",
        "itl": f"sum by (le) (rate({ITL}_bucket{router}{w}))",
        "itl_sum": f"sum(rate({ITL}_sum{router}{w}))",
        "prompt": f"sum(rate(baton_prompt_tokens_total{selector(namespace, model, 'prefill')}"
                  f"{w}))",
        "generation": f"sum(rate(baton_generation_tokens_total"
                      f"{selector(namespace, model, 'decode')}{w}))",
        "prefill_waiting": f"sum(baton_requests_waiting"
                           f"{selector(namespace, model, 'router|prefill')})",
        "decode_waiting": f"sum(baton_requests_waiting{selector(namespace, model, 'decode')})",
        "decode_running": f"sum(baton_requests_running{selector(namespace, model, 'decode')})",
        "finished": f"sum(rate(baton_requests_total{admitted}{w}))",
        "in_flight_growth": f"sum(delta(baton_requests_running{router}{w}))",
    }
    short = (int(short_window_seconds) if short_window_seconds is not None
             and 0 < short_window_seconds < window_seconds else None)
    if short is not None:
        queries["short_finished"] = f"sum(rate(baton_requests_total{admitted}[{short}s]))"
        queries["short_growth"] = f"sum(delta(baton_requests_running{router}[{short}s]))"
    names = list(queries)
    results = await asyncio.gather(*(prom.query(queries[n]) for n in names))
    got = dict(zip(names, results))
    for name, samples in got.items():
        if not samples:
            raise MissingSeries(queries[name])

    def scalar(name: str, signed: bool = False) -> float:
        samples = got[name]
        if len(samples) != 1:
            raise PrometheusQueryError(queries[name], "cardinality",
                                       f"expected one series, got {len(samples)}")
        value = samples[0].value
        if math.isnan(value):
            return 0.0
        return value if signed else max(0.0, value)

    ttft_buckets, itl_buckets = _buckets(got["ttft"]), _buckets(got["itl"])
    for name, buckets in (("ttft", ttft_buckets), ("itl", itl_buckets)):
        if not any(math.isinf(le) for le, _ in buckets):
            raise MissingSeries(queries[name])
    request_rate = max(count for le, count in ttft_buckets if math.isinf(le))
    itl_count = max(count for le, count in itl_buckets if math.isinf(le))
    itl_sum = scalar("itl_sum")
    return Observation(
        request_rate=max(0.0, request_rate),
        prompt_tokens_per_second=scalar("prompt"),
        generation_tokens_per_second=scalar("generation"),
        prefill_waiting=scalar("prefill_waiting"),
        decode_running=scalar("decode_running"),
        decode_waiting=scalar("decode_waiting"),
        ttft_attainment=attainment_from_buckets(ttft_buckets, ttft_target),
        itl_attainment=attainment_from_buckets(itl_buckets, itl_target),
        mean_itl_seconds=itl_sum / itl_count if itl_count > 0 else None,
        arrival_rate=max(0.0, scalar("finished") + scalar("in_flight_growth", signed=True)
                         / window_seconds),
        window_seconds=float(window_seconds),
        short_arrival_rate=None if short is None else max(
            0.0, scalar("short_finished") + scalar("short_growth", signed=True) / short),
        short_window_seconds=float(short if short is not None else window_seconds),
    )


async def read_pod_load(prom: PrometheusClient, namespace: str, model: str, role: str,
                        pool: str) -> dict[str, float]:
    """Requests running plus waiting per pod of one pool (pods that export no series are
    absent). Used to drain the least-loaded replicas first."""
    sel = selector(namespace, model, role, pool)
    samples = await prom.query(
        f"sum by (pod) (baton_requests_running{sel} + baton_requests_waiting{sel})")
    return {s.labels["pod"]: s.value for s in samples if "pod" in s.labels}
