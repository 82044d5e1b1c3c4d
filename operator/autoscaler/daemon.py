"""The autoscaler as a kopf daemon per Model (importing this module registers it).

Every spec.autoscaling.intervalSeconds, for each Model with autoscaling enabled:
1. read the replicas each pool's Deployment has, and the pods Pending (unscheduled) for
   longer than pendingTimeoutSeconds, from the Kubernetes API;
2. read an Observation from Prometheus (baton.operator.autoscaler.metrics); when that fails
   the policy holds the last decision and the reason says why;
3. run the policy (baton.operator.autoscaler.policy.decide);
4. mark the pods to remove with controller.kubernetes.io/pod-deletion-cost (Pending pods
   first, then unready ones, then the least loaded, then the youngest) so the ReplicaSet
   removes those; they drain on SIGTERM. Pods marked by an earlier round count (the
   Deployment may not have been lowered yet), and marks of a scale-down called off are
   cleared;
5. write status.autoscaler, the only thing this daemon writes on the Model (the reconcile
   sets the Deployments' replicas from status.autoscaler.desired: DESIGN.md, Seams);
6. post an Event when replicas change (ScaledUp, ScaledDown or Scaled, explaining each
   role that changes) or metrics go missing (MetricsUnavailable), and export
   baton_autoscaler_desired_replicas and baton_autoscaler_decisions_total.

status.autoscaler: {lastScaleTime, lastDecisionTime, reason, held, desired, demand, limited,
observed, memory}; `observed` is what the metrics said, `memory` the policy's state between
runs (epoch seconds; `recent` rows are [time, arrivals/s, prefill queued, needed prefill,
needed decode, projected prefill, projected decode]), kept in status so a restarted operator
continues where it left off.

Settings (environment of the operator): BATON_AUTOSCALER_PROFILE, a replica profile JSON
file (default: the built-in H100 estimate, baton.operator.autoscaler.profile);
BATON_AUTOSCALER_MIN_RATE_WINDOW_SECONDS, the shortest rate() window (default 60: at least
two scrapes at a 30 s scrape interval). The arrivals are read over this short window (the
scrape resolution: the ramp detector's input) and every rate over the rate window, twice
that and at least 2 x intervalSeconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kopf
from prometheus_client import Counter, Gauge

from baton.operator.autoscaler.metrics import read_observation, read_pod_load
from baton.operator.autoscaler.policy import (
    ROLES,
    Decision,
    Observation,
    PolicyState,
    Recent,
    decide,
)
from baton.operator.autoscaler.profile import ReplicaProfile, load_profile
from baton.operator.autoscaler.prometheus import PrometheusClient, PrometheusError
from baton.operator.kube import ApiError, Kube, Resource
from baton.operator.spec import GROUP, PLURAL, VERSION, Model, SpecError

__all__ = ["autoscale", "run_once", "scale_event", "KubernetesCluster", "state_from_status",
           "status_from_decision", "pods_to_drain", "pending_pods", "min_rate_window_seconds",
           "DELETION_COST", "MIN_RATE_WINDOW_SECONDS", "DESIRED_REPLICAS", "DECISIONS"]

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_COST = "-1000"
"""Deletion cost of a pod chosen for removal (others default to 0; lower goes first)."""
MIN_RATE_WINDOW_SECONDS = 60
"""Shortest rate() window by default: two scrapes at the usual 30 s scrape interval."""
RATE_WINDOW_ENV = "BATON_AUTOSCALER_MIN_RATE_WINDOW_SECONDS"
"""Overrides MIN_RATE_WINDOW_SECONDS (at least 2x the scrape interval, e.g. 20 at 10 s)."""
PROFILE_ENV = "BATON_AUTOSCALER_PROFILE"
"""A replica profile JSON file (profile.py); unset: DEFAULT_PROFILE."""


def min_rate_window_seconds() -> int:
    """The shortest rate() window: $BATON_AUTOSCALER_MIN_RATE_WINDOW_SECONDS or 60."""
    value = os.environ.get(RATE_WINDOW_ENV)
    if not value:
        return MIN_RATE_WINDOW_SECONDS
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 2:
        raise ValueError(f"{RATE_WINDOW_ENV} must be an integer number of seconds >= 2, "
                         f"got {value!r}")
    return seconds

DESIRED_REPLICAS = Gauge("baton_autoscaler_desired_replicas",
                         "Replicas the autoscaler wants per pool.",
                         ("namespace", "model", "role", "pool"))
DECISIONS = Counter("baton_autoscaler_decisions",
                    "Autoscaler decisions, by outcome (scaled, unchanged, held).",
                    ("namespace", "model", "outcome"))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()


def state_from_status(status: Any) -> PolicyState:
    """The policy state kept in status.autoscaler (empty when there is none or it is
    unreadable: the policy then starts afresh, which is safe)."""
    auto = (status or {}).get("autoscaler") or {}
    memory = auto.get("memory") or {}
    try:
        desired = auto.get("desired") or None
        if desired is not None:
            desired = {r: {p: int(n) for p, n in (desired.get(r) or {}).items()} for r in ROLES}
        return PolicyState(
            desired=desired,
            last_scale_time=_epoch(auto.get("lastScaleTime")),
            last_boost={r: float(t) for r, t in (memory.get("lastBoost") or {}).items()
                        if t is not None},
            last_scale_up={r: float(t) for r, t in (memory.get("lastScaleUp") or {}).items()
                           if t is not None},
            # entries of another shape (an older operator's) are dropped: a fresh start
            recent=tuple(Recent.from_list(entry) for entry in memory.get("recent") or []
                         if len(entry) == 7),
            mean_prompt_tokens=(None if memory.get("meanPromptTokens") is None
                                else float(memory["meanPromptTokens"])),
            full_pools={str(k): (float(t), int(n)) for k, t, n in memory.get("fullPools") or []},
            observing_since=_epoch(memory.get("observingSince")),
        )
    except (TypeError, ValueError, AttributeError):
        return PolicyState()


def _observed(observation: Observation | None) -> dict | None:
    if observation is None:
        return None
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)
    o = observation
    return {"arrivalsPerSecond": r(o.arrivals), "requestsPerSecond": r(o.request_rate),
            "promptTokensPerSecond": r(o.prompt_tokens_per_second),
            "generationTokensPerSecond": r(o.generation_tokens_per_second),
            "prefillWaiting": r(o.prefill_waiting), "decodeRunning": r(o.decode_running),
            "decodeWaiting": r(o.decode_waiting), "ttftAttainment": r(o.ttft_attainment),
            "itlAttainment": r(o.itl_attainment), "meanItlSeconds": r(o.mean_itl_seconds)}


def status_from_decision(decision: Decision, now: float,
                         observation: Observation | None = None) -> dict:
    """The status.autoscaler object for a decision (lists replace wholesale under a merge
    patch, so nothing stale survives; `observed` is null when metrics were missing)."""
    state = decision.state
    return {
        "observed": _observed(observation),
        "lastScaleTime": _iso(state.last_scale_time) if state.last_scale_time else None,
        "lastDecisionTime": _iso(now),
        "reason": decision.reason,
        "held": decision.held,
        "desired": {role: dict(pools) for role, pools in decision.desired.items()},
        "demand": {r: round(v, 3) for r, v in decision.demand.items()} or None,
        "limited": list(decision.limited),
        "memory": {
            "lastBoost": {r: state.last_boost.get(r) for r in ROLES},
            "lastScaleUp": {r: state.last_scale_up.get(r) for r in ROLES},
            "recent": [[round(v, 3) for v in entry.as_list()] for entry in state.recent],
            "meanPromptTokens": (None if state.mean_prompt_tokens is None
                                 else round(state.mean_prompt_tokens, 3)),
            "fullPools": [[k, round(t, 3), n] for k, (t, n) in sorted(state.full_pools.items())],
            "observingSince": state.observing_since,
        },
    }


def _is_unscheduled(pod: dict) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled":
            return cond.get("status") != "True"
    return True


def _is_ready(pod: dict) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _pool_pods(pods: list[dict], model: str, role: str, pool: str) -> list[dict]:
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if (labels.get("baton.dev/model") == model and labels.get("baton.dev/role") == role
                and labels.get("baton.dev/pool") == pool and not meta.get("deletionTimestamp")):
            out.append(pod)
    return out


def pending_pods(pods: list[dict], model: Model, now: float) -> dict[str, dict[str, int]]:
    """Pods per (role, pool) unscheduled for longer than pendingTimeoutSeconds."""
    timeout = model.spec.autoscaling.pending_timeout_seconds
    out: dict[str, dict[str, int]] = {}
    for role in ROLES:
        out[role] = {}
        for pool in model.spec.role(role).pools:
            count = 0
            for pod in _pool_pods(pods, model.name, role, pool.name):
                created = _epoch((pod.get("metadata") or {}).get("creationTimestamp"))
                if _is_unscheduled(pod) and created is not None and now - created >= timeout:
                    count += 1
            out[role][pool.name] = count
    return out


def _marked(pod: dict) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return annotations.get(DELETION_COST) == DRAIN_COST


def pods_to_drain(pods: list[dict], n: int, load: dict[str, float]) -> list[str]:
    """Names of the n pods to remove first: unscheduled, then unready, then the least
    loaded (pods without a load series count as idle), then the youngest."""
    def key(pod: dict) -> tuple:
        meta = pod.get("metadata") or {}
        created = _epoch(meta.get("creationTimestamp")) or 0.0
        return (not _is_unscheduled(pod), _is_ready(pod), load.get(meta.get("name"), 0.0),
                -created, meta.get("name", ""))
    return [p["metadata"]["name"] for p in sorted(pods, key=key)[:max(0, n)]]


DEPLOYMENTS = Resource("apps/v1", "deployments")
PODS = Resource("v1", "pods")
MODELS = Resource(f"{GROUP}/{VERSION}", PLURAL)


@dataclass
class KubernetesCluster:
    """The few API calls the daemon makes, through the operator's client (in threads)."""

    kube: Kube | None = None

    def _kube(self) -> Kube:
        if self.kube is None:
            self.kube = Kube.from_config(os.environ.get("KUBECONFIG") or None)
        return self.kube

    async def deployment_replicas(self, namespace: str, name: str) -> int | None:
        obj = await asyncio.to_thread(self._kube().get, DEPLOYMENTS, namespace, name)
        replicas = None if obj is None else (obj.get("spec") or {}).get("replicas")
        return None if replicas is None else int(replicas)

    async def model_pods(self, namespace: str, model: str) -> list[dict]:
        return await asyncio.to_thread(self._kube().list, PODS, namespace,
                                       {"baton.dev/model": model})

    async def annotate_pod(self, namespace: str, name: str, annotations: dict) -> None:
        """Sets (or with None removes) annotations; a pod that is already gone (the
        ReplicaSet removed it since it was listed) needs none."""
        try:
            await asyncio.to_thread(self._kube().merge_patch, PODS, namespace, name,
                                    {"metadata": {"annotations": annotations}})
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def patch_model_status(self, namespace: str, name: str, status: dict) -> None:
        await asyncio.to_thread(self._kube().merge_patch, MODELS, namespace, name,
                                {"status": status}, "status")


async def run_once(model: Model, body: Any, cluster: KubernetesCluster,
                   prom: PrometheusClient | None, profile: ReplicaProfile, now: float,
                   logger: logging.Logger | logging.LoggerAdapter, state: PolicyState,
                   was_held: bool = False) -> Decision:
    """One autoscaling round for one Model; returns the decision it applied. state: what
    the last round decided (the daemon keeps it; status holds a copy for restarts). body:
    the Model, for Events."""
    auto = model.spec.autoscaling
    current: dict[str, dict[str, int]] = {}
    for role in ROLES:
        current[role] = {}
        for pool in model.spec.role(role).pools:
            replicas = await cluster.deployment_replicas(
                model.namespace, f"{model.name}-{role}-{pool.name}")
            if replicas is None:  # not created yet: what the reconcile is about to apply
                replicas = (state.desired or {}).get(role, {}).get(pool.name, pool.min_replicas)
            current[role][pool.name] = replicas
    pods = await cluster.model_pods(model.namespace, model.name)
    pending = pending_pods(pods, model, now)

    observation, missing = None, ""
    if prom is None:
        missing = "spec.autoscaling.prometheusUrl is not set"
    else:
        try:
            observation = await read_observation(
                prom, model.namespace, model.name,
                ttft_target=auto.targets.time_to_first_token_seconds,
                itl_target=auto.targets.inter_token_latency_seconds,
                window_seconds=max(2 * min_rate_window_seconds(), 2 * auto.interval_seconds),
                short_window_seconds=min_rate_window_seconds())
        except PrometheusError as e:
            missing = str(e)
    decision = decide(model.spec, observation, current, pending, state, now, profile, missing)

    for role in ROLES:
        for pool, keep in decision.desired[role].items():
            await _mark_for_removal(cluster, prom, model, role, pool, keep,
                                    decision.drain.get(role, {}).get(pool, 0),
                                    _pool_pods(pods, model.name, role, pool), logger)

    patch = status_from_decision(decision, now, observation)
    # a merge patch keeps keys it does not mention: null out pools no longer in the spec
    written = (((body.get("status") or {}).get("autoscaler") or {}).get("desired")) or {}
    for earlier in (written, state.desired or {}):
        for role, pools in earlier.items():
            for pool in pools or {}:
                if role in patch["desired"] and pool not in patch["desired"][role]:
                    patch["desired"][role][pool] = None
                    _forget_pool(model.namespace, model.name, role, pool)
    await cluster.patch_model_status(model.namespace, model.name, {"autoscaler": patch})

    for role in ROLES:
        for pool, n in decision.desired[role].items():
            DESIRED_REPLICAS.labels(model.namespace, model.name, role, pool).set(n)
    outcome = "held" if decision.held else "scaled" if decision.changed else "unchanged"
    DECISIONS.labels(model.namespace, model.name, outcome).inc()
    event = scale_event(decision, current)
    if event is not None:
        kind, message = event
        # kopf.event, not kopf.info: the operator posts Kopf's own log lines only from
        # WARNING up (handlers.configure_kopf), which would drop an info Event too
        kopf.event(body, type="Normal", reason=kind, message=message[:1000])
        logger.info(f"{kind} {model.namespace}/{model.name}: {message}")
    elif decision.held and not was_held:
        kopf.event(body, type="Warning", reason="MetricsUnavailable",
                   message=decision.reason[:1000])
        logger.warning(f"Held {model.namespace}/{model.name}: {decision.reason}")
    return decision


def scale_event(decision: Decision, current: dict[str, dict[str, int]]) -> tuple[str, str] | None:
    """The Event for a decision that changes replicas: reason ScaledUp (pools only grow),
    ScaledDown (pools only shrink) or Scaled (both); the message explains each role that
    changes, e.g. "prefill hopper 1 -> 3: sized for 137k prompt tokens/s expected 120 s
    ahead, when replicas started now serve (arrivals 15.1/s rising 1.9/s per minute; now
    104k)". None when nothing changes or metrics were missing."""
    if decision.held or not decision.changed:
        return None
    grows = shrinks = False
    roles = []
    for role, pools in decision.desired.items():
        before = current.get(role) or {}
        deltas = [n - before.get(pool, 0) for pool, n in pools.items()]
        if any(deltas):
            roles.append(role)
        grows |= any(d > 0 for d in deltas)
        shrinks |= any(d < 0 for d in deltas)
    if not roles:
        return None
    kind = "Scaled" if grows and shrinks else "ScaledUp" if grows else "ScaledDown"
    return kind, "; ".join(decision.explanations.get(role, role) for role in roles)


async def _mark_for_removal(cluster: KubernetesCluster, prom: PrometheusClient | None,
                            model: Model, role: str, pool: str, keep: int, drain: int,
                            members: list[dict],
                            logger: logging.Logger | logging.LoggerAdapter) -> None:
    """When the pool shrinks (`drain` > 0), marks for removal the pods beyond the `keep` it
    keeps, counting those marked already: the ReplicaSet removes pods - replicas pods, lowest
    deletion cost first, so a round that runs before the Deployment was lowered, or after
    some marked pods went, marks no further pods. Marks left over from a scale-down that was
    called off (the pool keeps all its pods) are cleared, so the next scale-down picks by
    load again rather than by a stale mark."""
    marked = [p for p in members if _marked(p)]
    if drain <= 0:
        if marked and len(members) <= keep:
            for p in marked:
                await cluster.annotate_pod(model.namespace, p["metadata"]["name"],
                                           {DELETION_COST: None})
                logger.info(f"Unmarked pod {p['metadata']['name']} ({role}/{pool}): the pool "
                            f"keeps it.")
        return
    needed = len(members) - keep - len(marked)
    if needed <= 0:
        return
    load: dict[str, float] = {}
    if prom is not None:
        try:
            load = await read_pod_load(prom, model.namespace, model.name, role, pool)
        except PrometheusError as e:
            logger.info(f"Per-pod load of {role}/{pool} was unavailable ({e}); "
                        f"draining by readiness and age.")
    unmarked = [p for p in members if not _marked(p)]
    for name in pods_to_drain(unmarked, needed, load):
        await cluster.annotate_pod(model.namespace, name, {DELETION_COST: DRAIN_COST})
        logger.info(f"Marked pod {name} ({role}/{pool}) for removal.")


def _forget_pool(namespace: str, model: str, role: str, pool: str) -> None:
    try:
        DESIRED_REPLICAS.remove(namespace, model, role, pool)
    except KeyError:
        pass


def _enabled(spec: Any, **_: Any) -> bool:
    return bool(((spec or {}).get("autoscaling") or {}).get("enabled"))


@kopf.daemon(GROUP, VERSION, PLURAL, id="autoscaler", when=_enabled,
             cancellation_timeout=10.0)
async def autoscale(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                    **_: Any) -> None:
    """Runs the policy for one Model every intervalSeconds until the Model is deleted or
    autoscaling is turned off."""
    profile = load_profile(os.environ.get(PROFILE_ENV) or None)
    min_rate_window_seconds()  # a bad setting fails here, before any decision
    cluster = KubernetesCluster()
    # Rounds chain through this memory; the copy in status only seeds it (a restarted
    # operator), since the watched body may lag behind the status this daemon wrote.
    status = body.get("status") or {}
    state = state_from_status(status)
    held = bool((status.get("autoscaler") or {}).get("held"))
    prom: PrometheusClient | None = None
    prom_url: str | None = None
    try:
        while not stopped:
            interval = 30.0
            try:
                model = Model.from_resource(dict(body))
                auto = model.spec.autoscaling
                interval = float(auto.interval_seconds)
                if auto.prometheus_url != prom_url:
                    if prom is not None:
                        await prom.close()
                    prom_url = auto.prometheus_url
                    prom = None if prom_url is None else PrometheusClient(
                        prom_url, timeout=max(1.0, min(10.0, interval / 2)))
                decision = await run_once(model, body, cluster, prom, profile, time.time(),
                                          logger, state, held)
                state, held = decision.state, decision.held
            except SpecError as e:
                # The reconcile reports the invalid spec as a condition; nothing to size.
                logger.debug(f"Skipped autoscaling: invalid spec ({e}).")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one failed round must not stop the Model's autoscaling
                logger.exception(f"Autoscaling round failed: {type(e).__name__}: {e}")
            await stopped.wait(max(1.0, interval) if math.isfinite(interval) else 30.0)
    finally:
        if prom is not None:
            await prom.close()
        # the Model is gone or no longer autoscaled: its desired replicas are no one's
        for role, pools in (state.desired or {}).items():
            for pool in pools:
                _forget_pool(body.metadata.namespace or "default", body.metadata.name, role,
                             pool)
