"""Status from owned Deployments: conditions, counts, transition times."""

from __future__ import annotations

import pytest

from baton.operator.fields import SpecError
from baton.operator.spec import Model
from baton.operator.status import (
    Condition,
    find_condition,
    invalid_spec_status,
    model_status,
    set_condition,
    status_changed,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def model(autoscaling=None, desired=None, generation=3) -> Model:
    obj = {"metadata": {"name": "nano", "namespace": "llm", "uid": "u",
                        "generation": generation},
           "spec": {"source": {"uri": "pvc://s/nano"},
                    "prefill": {"pools": [{"name": "b", "minReplicas": 1, "maxReplicas": 2},
                                          {"name": "h", "minReplicas": 0, "maxReplicas": 4}]},
                    "decode": {"pools": [{"name": "h", "minReplicas": 2, "maxReplicas": 2}]}}}
    if autoscaling:
        obj["spec"]["autoscaling"] = autoscaling
    if desired:
        obj["status"] = {"autoscaler": {"desired": desired}}
    return Model.from_resource(obj)


def deployment(name: str, replicas: int, current: int, ready: int) -> dict:
    return {"metadata": {"name": name}, "spec": {"replicas": replicas},
            "status": {"replicas": current, "readyReplicas": ready}}


def test_set_condition_keeps_transition_time_while_status_holds():
    conditions = set_condition([], Condition("Ready", False, "NotServing", "a", 1), T0)
    conditions = set_condition(conditions, Condition("Ready", False, "NotServing", "b", 2), T1)
    (ready,) = conditions
    assert ready == {"type": "Ready", "status": "False", "reason": "NotServing", "message": "b",
                     "observedGeneration": 2, "lastTransitionTime": T0}
    conditions = set_condition(conditions, Condition("Ready", True, "AllPoolsReady", "c", 2), T1)
    assert conditions[0]["lastTransitionTime"] == T1 and conditions[0]["status"] == "True"


def test_condition_reason_must_be_camel_case():
    with pytest.raises(ValueError, match="CamelCase"):
        Condition("Ready", True, "all ready", "", 1)


def test_counts_and_conditions_from_deployments():
    deps = [deployment("nano-prefill-b", 1, 1, 1), deployment("nano-prefill-h", 0, 0, 0),
            deployment("nano-decode-h", 2, 2, 1), deployment("nano-router", 1, 1, 1)]
    status = model_status(model(), deps, None, T0)
    assert status["observedGeneration"] == 3
    assert status["endpoint"] == "http://nano-router.llm.svc:8000/v1"
    assert status["prefill"] == {"replicas": 1, "readyReplicas": 1, "pools": [
        {"name": "b", "desiredReplicas": 1, "replicas": 1, "readyReplicas": 1},
        {"name": "h", "desiredReplicas": 0, "replicas": 0, "readyReplicas": 0}]}
    assert status["decode"]["readyReplicas"] == 1
    by_type = {c["type"]: c for c in status["conditions"]}
    assert [c["type"] for c in status["conditions"]] == [
        "Ready", "PrefillReady", "DecodeReady", "Degraded", "ScalingLimited", "TransportSecure"]
    assert (by_type["TransportSecure"]["status"], by_type["TransportSecure"]["reason"]) == (
        "True", "MutualTLS")
    assert by_type["Ready"]["status"] == "True"
    assert by_type["Ready"]["reason"] == "ServingDegraded"
    assert by_type["Degraded"]["status"] == "True"
    assert by_type["Degraded"]["message"] == "decode/h 1/2 ready"
    assert by_type["ScalingLimited"]["reason"] == "AutoscalingDisabled"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_not_serving_without_router_or_role():
    deps = [deployment("nano-prefill-b", 1, 1, 1), deployment("nano-decode-h", 2, 2, 2),
            deployment("nano-router", 1, 1, 0)]
    ready = find_condition(model_status(model(), deps, None, T0)["conditions"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotServing")
    assert ready["message"] == "no ready replicas: router"
    missing = model_status(model(), [], None, T0)
    assert find_condition(missing["conditions"], "PrefillReady")["reason"] == "NoReadyReplicas"


def test_all_ready_and_stable_status_is_not_rewritten():
    deps = [deployment("nano-prefill-b", 1, 1, 1), deployment("nano-decode-h", 2, 2, 2),
            deployment("nano-router", 1, 1, 1)]
    first = model_status(model(), deps, None, T0)
    assert find_condition(first["conditions"], "Ready")["reason"] == "AllPoolsReady"
    again = model_status(model(), deps, first, T1)
    assert not status_changed(first, again)  # same facts later: no write


def test_scaling_limited_when_every_pool_of_a_role_is_at_max():
    auto = {"enabled": True, "prometheusUrl": "http://p:9090"}
    limited = model_status(model(auto, {"prefill": {"b": 2, "h": 4}}), [], None, T0)
    cond = find_condition(limited["conditions"], "ScalingLimited")
    # decode's only pool has min = max = 2, prefill is at max in both pools
    assert cond["status"] == "True" and cond["reason"] == "AtReplicaLimit"
    assert "every prefill pool is at maxReplicas" in cond["message"]
    assert "every decode pool is at maxReplicas" in cond["message"]
    over = model_status(model(auto, {"prefill": {"b": 9}}), [], None, T0)
    assert "prefill/b wants 9 > maxReplicas 2" in find_condition(over["conditions"],
                                                                 "ScalingLimited")["message"]


def test_invalid_spec_status_keeps_other_conditions():
    previous = model_status(model(), [], None, T0)
    status = invalid_spec_status(SpecError("spec.x", "bad"), 4, previous, T1)
    assert set(status) == {"observedGeneration", "conditions"}
    ready = find_condition(status["conditions"], "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidSpec",
                                                                    "spec.x: bad")
    assert ready["lastTransitionTime"] == T0  # it was False before too
    assert find_condition(status["conditions"], "Degraded") is not None
    assert not status_changed({**previous, **status},
                              invalid_spec_status(SpecError("spec.x", "bad"), 4,
                                                  {**previous, **status}, T1))


def pod(name: str, role: str, pool: str | None, status: dict) -> dict:
    labels = {"baton.dev/model": "nano", "baton.dev/role": role}
    if pool:
        labels["baton.dev/pool"] = pool
    return {"metadata": {"name": name, "labels": labels}, "status": status}


def test_degraded_says_why_a_pool_is_short():
    crashing = pod("nano-decode-h-1", "decode", "h", {"containerStatuses": [{
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
        "lastState": {"terminated": {"exitCode": 2, "message":
                                     "loading /models/source\nValueError: checkpoint is fp8, "
                                     "spec.quantization says nvfp4"}}}]})
    pending = pod("nano-router-1", "router", None, {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient cpu."}]})
    fine = pod("nano-decode-h-0", "decode", "h", {"containerStatuses": [
        {"state": {"running": {}}, "ready": True}]})
    deps = [deployment("nano-prefill-b", 1, 1, 1), deployment("nano-decode-h", 2, 2, 1),
            deployment("nano-router", 1, 1, 0)]
    status = model_status(model(), deps, None, T0, pods=[fine, pending, crashing])
    message = find_condition(status["conditions"], "Degraded")["message"]
    assert message == (
        "decode/h 1/2 ready (pod nano-decode-h-1: CrashLoopBackOff: ValueError: checkpoint is "
        "fp8, spec.quantization says nvfp4); router 0/1 ready (pod nano-router-1: "
        "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.)")
    # without pods, the same counts
    plain = model_status(model(), deps, None, T0)
    assert find_condition(plain["conditions"], "Degraded")["message"] == (
        "decode/h 1/2 ready; router 0/1 ready")
