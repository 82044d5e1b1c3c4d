"""Model status: conditions and replica counts, computed from the owned Deployments.

Pure functions: `model_status(model, deployments, previous, now)` returns the status fields
the operator owns (everything except status.autoscaler, which only the autoscaler writes);
`invalid_spec_status(error, generation, previous, now)` the same for a spec the operator
cannot run. Conditions follow Kubernetes conventions: type, status "True"/"False"/"Unknown",
a CamelCase reason, a message, observedGeneration, and lastTransitionTime that moves only
when the status value changes.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

from baton.operator.builders import endpoint, object_name
from baton.operator.fields import SpecError
from baton.operator.spec import ROLES, Model

CONDITION_TYPES = ("Ready", "PrefillReady", "DecodeReady", "Degraded", "ScalingLimited",
                   "TransportSecure")
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str
    observed_generation: int

    def __post_init__(self) -> None:
        if not _REASON.match(self.reason):
            raise ValueError(f"condition reason must be CamelCase, got {self.reason!r}")

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def set_condition(conditions: list[dict], condition: Condition, now: str) -> list[dict]:
    """`conditions` with `condition` set; lastTransitionTime kept unless the status changed."""
    out: list[dict] = []
    replaced = False
    new = {"type": condition.type, "status": condition.status_text,
           "reason": condition.reason, "message": condition.message,
           "observedGeneration": condition.observed_generation, "lastTransitionTime": now}
    for old in conditions:
        if old.get("type") != condition.type:
            out.append(old)
            continue
        if old.get("status") == new["status"] and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        out.append(new)
        replaced = True
    if not replaced:
        out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.get("type"), len(order)))


def find_condition(conditions: list[dict], type_: str) -> dict | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def _counts(deployment: dict | None) -> tuple[int, int, int]:
    """(spec, current, ready) replicas of a Deployment; a missing one counts as zeros."""
    if deployment is None:
        return 0, 0, 0
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    return (int(spec.get("replicas") or 0), int(status.get("replicas") or 0),
            int(status.get("readyReplicas") or 0))


def _role_status(model: Model, role: str,
                 by_name: dict[str, dict]) -> tuple[dict, list[tuple[str, str]]]:
    """Counts of one role, and (pool, "role/pool r/d ready") for pools short of ready."""
    pools = []
    short: list[tuple[str, str]] = []
    total = ready = 0
    for pool in model.spec.role(role).pools:
        # Desired from the Model, not the Deployment: a Deployment not created yet still
        # owes its replicas.
        desired = model.desired_replicas(role, pool)
        _, current, pool_ready = _counts(by_name.get(object_name(model, role, pool.name)))
        pools.append({"name": pool.name, "desiredReplicas": desired, "replicas": current,
                      "readyReplicas": pool_ready})
        total += current
        ready += pool_ready
        if pool_ready < desired:
            short.append((pool.name, f"{role}/{pool.name} {pool_ready}/{desired} ready"))
    return {"replicas": total, "readyReplicas": ready, "pools": pools}, short


def _role_condition(model: Model, role: str, counts: dict) -> Condition:
    cond_type = f"{role.capitalize()}Ready"
    desired = sum(p["desiredReplicas"] for p in counts["pools"])
    ready = counts["readyReplicas"]
    message = f"{ready}/{desired} {role} replicas ready"
    if ready > 0:
        return Condition(cond_type, True, "ReplicasReady", message, model.generation)
    if desired == 0:
        return Condition(cond_type, False, "NoReplicas",
                         f"every {role} pool is sized to 0 replicas", model.generation)
    return Condition(cond_type, False, "NoReadyReplicas", message, model.generation)


def _scaling_condition(model: Model) -> Condition:
    if not model.spec.autoscaling.enabled:
        return Condition("ScalingLimited", False, "AutoscalingDisabled",
                         "pools run at minReplicas", model.generation)
    limited = []
    for role in ROLES:
        for pool in model.spec.role(role).pools:
            wanted = model.status.desired.get(role, {}).get(pool.name)
            if wanted is None:
                continue
            if wanted > pool.max_replicas:
                limited.append(f"{role}/{pool.name} wants {wanted} > maxReplicas "
                               f"{pool.max_replicas}")
            elif wanted < pool.min_replicas:
                limited.append(f"{role}/{pool.name} wants {wanted} < minReplicas "
                               f"{pool.min_replicas}")
        pools = model.spec.role(role).pools
        at_max = [p for p in pools
                  if model.desired_replicas(role, p) >= p.max_replicas]
        if len(at_max) == len(pools):
            limited.append(f"every {role} pool is at maxReplicas")
    if limited:
        return Condition("ScalingLimited", True, "AtReplicaLimit", "; ".join(limited),
                         model.generation)
    return Condition("ScalingLimited", False, "WithinLimits",
                     "every pool can scale within its limits", model.generation)


def _transport_condition(model: Model) -> Condition:
    if model.spec.security.transport == "mtls":
        return Condition("TransportSecure", True, "MutualTLS",
                         "worker gRPC ports take only callers with a certificate from the "
                         "Model's CA, each call authorized by the certificate's role",
                         model.generation)
    return Condition("TransportSecure", False, "PlaintextOptOut",
                     "spec.security.transport is plaintext: worker gRPC ports take any caller "
                     "that reaches them, without authorization", model.generation)


# Waiting reasons that mean a container will not start without a change (image, config,
# checkpoint): worth naming in the Degraded message.
_STUCK_REASONS = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                  "CreateContainerConfigError", "CreateContainerError", "InvalidImageName")
_PROBLEM_CHARS = 300


def pod_problem(pod: dict) -> str | None:
    """Why a pod does not become ready, when the pod says so: unschedulable, or a container
    stuck (with its last termination message: the pods keep the tail of the log on error)."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if (cond.get("type") == "PodScheduled" and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"):
            return f"Unschedulable: {cond.get('message', '')}".strip()
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_REASONS:
            terminated = (cs.get("lastState") or {}).get("terminated") or {}
            detail = (terminated.get("message") or waiting.get("message") or "").strip()
            detail = detail.splitlines()[-1] if detail else ""
            return f"{waiting['reason']}: {detail}" if detail else waiting["reason"]
    return None


def _explain(short: str, pods: list[dict]) -> str:
    problems = []
    for pod in pods:
        problem = pod_problem(pod)
        if problem:
            problems.append(f"pod {pod['metadata']['name']}: {problem}"[:_PROBLEM_CHARS])
    return f"{short} ({problems[0]})" if problems else short


def _pods_of(pods: list[dict], role: str, pool: str | None) -> list[dict]:
    out = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get("baton.dev/role") == role and labels.get("baton.dev/pool") == pool:
            out.append(pod)
    return sorted(out, key=lambda p: p["metadata"]["name"])


def model_status(model: Model, deployments: list[dict], previous: dict | None,
                 now: str, pods: list[dict] | None = None) -> dict:
    """The operator's status fields for a valid Model, from its owned Deployments (and its
    pods, when given, to say why a pool is short of ready replicas)."""
    previous = previous or {}
    pods = pods or []
    by_name = {d["metadata"]["name"]: d for d in deployments}
    roles: dict[str, dict] = {}
    short: list[str] = []
    for role in ROLES:
        roles[role], role_short = _role_status(model, role, by_name)
        for pool_name, text in role_short:
            short.append(_explain(text, _pods_of(pods, role, pool_name)))
    router_desired = model.spec.router.replicas
    _, router_current, router_ready = _counts(by_name.get(object_name(model, "router")))
    if router_ready < router_desired:
        short.append(_explain(f"router {router_ready}/{router_desired} ready",
                              _pods_of(pods, "router", None)))

    conditions = list(previous.get("conditions") or [])
    role_conditions = {role: _role_condition(model, role, roles[role]) for role in ROLES}
    for cond in role_conditions.values():
        conditions = set_condition(conditions, cond, now)
    if short:
        degraded = Condition("Degraded", True, "ReplicasNotReady", "; ".join(short),
                             model.generation)
    else:
        degraded = Condition("Degraded", False, "AllReplicasReady",
                             "every pool has its desired replicas ready", model.generation)
    conditions = set_condition(conditions, degraded, now)
    conditions = set_condition(conditions, _scaling_condition(model), now)
    conditions = set_condition(conditions, _transport_condition(model), now)

    not_ready = [role for role in ROLES if not role_conditions[role].status]
    if router_ready == 0:
        not_ready.append("router")
    if not_ready:
        ready = Condition("Ready", False, "NotServing",
                          f"no ready replicas: {', '.join(not_ready)}", model.generation)
    else:
        ready = Condition("Ready", True, "AllPoolsReady" if not short else "ServingDegraded",
                          "serving at " + endpoint(model), model.generation)
    conditions = set_condition(conditions, ready, now)
    return {
        "observedGeneration": model.generation,
        "endpoint": endpoint(model),
        "conditions": conditions,
        "prefill": roles["prefill"],
        "decode": roles["decode"],
        "router": {"replicas": router_current, "readyReplicas": router_ready},
    }


def invalid_spec_status(error: SpecError, generation: int, previous: dict | None,
                        now: str) -> dict:
    """Ready=False reason InvalidSpec naming the field; other fields stay as they were."""
    conditions = list((previous or {}).get("conditions") or [])
    conditions = set_condition(conditions, Condition("Ready", False, "InvalidSpec", str(error),
                                                     generation), now)
    return {"observedGeneration": generation, "conditions": conditions}


def status_changed(previous: dict | None, new: dict) -> bool:
    """Whether writing `new` would change any field of `previous` it sets."""
    previous = previous or {}
    return any(previous.get(key) != value for key, value in new.items())


def owned_status(status: Any) -> dict:
    """The status fields the operator owns (everything but the autoscaler's)."""
    return {k: v for k, v in (status or {}).items() if k != "autoscaler"}
