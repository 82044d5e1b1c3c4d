"""The daemon's pure parts (status round trip, pending pods, which pods drain) and its PromQL
reading (attainment from histogram buckets) without a cluster."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from baton.operator.autoscaler.daemon import (
    RATE_WINDOW_ENV,
    min_rate_window_seconds,
    pending_pods,
    pods_to_drain,
    state_from_status,
    status_from_decision,
)
from baton.operator.autoscaler.metrics import attainment_from_buckets, selector
from baton.operator.autoscaler.policy import Observation, PolicyState, decide
from baton.operator.autoscaler.profile import DEFAULT_PROFILE
from baton.operator.spec import Model

NOW = 1_800_000_000.0


def model(pending_timeout=120):
    pools = [{"name": "b200", "minReplicas": 1, "maxReplicas": 4, "relativeSpeed": "2.5",
              "costPerHour": "10"},
             {"name": "h100", "minReplicas": 0, "maxReplicas": 8, "costPerHour": "4.5"}]
    return Model.from_resource({
        "kind": "Model", "metadata": {"name": "nano", "namespace": "llm"},
        "spec": {"source": {"uri": "pvc://c/m"}, "prefill": {"pools": pools},
                 "decode": {"pools": pools},
                 "autoscaling": {"enabled": True, "prometheusUrl": "http://p:9090",
                                 "pendingTimeoutSeconds": pending_timeout}}})


def iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def pod(name, role="prefill", pool="h100", *, age=600.0, phase="Running", scheduled=True,
        ready=True, model_name="nano", deleting=False):
    meta = {"name": name, "creationTimestamp": iso(NOW - age),
            "labels": {"baton.dev/model": model_name, "baton.dev/role": role,
                       "baton.dev/pool": pool}}
    if deleting:
        meta["deletionTimestamp"] = iso(NOW)
    return {"metadata": meta,
            "status": {"phase": phase,
                       "conditions": [{"type": "PodScheduled",
                                       "status": "True" if scheduled else "False"},
                                      {"type": "Ready", "status": "True" if ready else "False"}]}}


def test_status_round_trips_the_policy_state():
    m = model()
    obs = Observation(request_rate=5, prompt_tokens_per_second=40000,
                      generation_tokens_per_second=30000, prefill_waiting=3,
                      decode_running=200, decode_waiting=0, ttft_attainment=0.9,
                      itl_attainment=1.0, mean_itl_seconds=0.02)
    current = {"prefill": {"b200": 1, "h100": 0}, "decode": {"b200": 1, "h100": 0}}
    pending = {"prefill": {"h100": 0}, "decode": {"b200": 1}}
    d = decide(m.spec, obs, current, pending, PolicyState(), NOW, DEFAULT_PROFILE)
    status = status_from_decision(d, NOW, obs)
    assert status["desired"] == d.desired
    assert status["observed"]["ttftAttainment"] == 0.9
    assert status["lastScaleTime"] == iso(NOW)
    back = state_from_status({"autoscaler": status})
    assert back.desired == d.desired
    assert back.last_scale_time == pytest.approx(math.floor(NOW))
    assert back.last_boost == pytest.approx(d.state.last_boost)
    assert [v for e in back.recent for v in e.as_list()] == pytest.approx(
        [v for e in d.state.recent for v in e.as_list()], rel=1e-6)
    assert back.full_pools == {"decode/b200": (pytest.approx(NOW), 0)}
    assert back.observing_since == pytest.approx(NOW)
    # a later decision from the restored state equals one from the original state
    again = decide(m.spec, obs, d.desired, {}, back, NOW + 30, DEFAULT_PROFILE)
    same = decide(m.spec, obs, d.desired, {}, d.state, NOW + 30, DEFAULT_PROFILE)
    assert again.desired == same.desired
    # unreadable memory starts afresh instead of failing
    assert state_from_status({"autoscaler": {"memory": {"recent": "x"}}}) == PolicyState()
    assert state_from_status(None) == PolicyState()


def test_pending_pods_count_after_the_timeout_and_only_unscheduled():
    m = model(pending_timeout=120)
    pods = [
        pod("a", pool="b200", phase="Pending", scheduled=False, age=300),
        pod("b", pool="b200", phase="Pending", scheduled=False, age=60),     # too young
        pod("c", pool="b200", phase="Pending", scheduled=True, age=300),     # pulling
        pod("d", pool="b200", phase="Pending", scheduled=False, age=300, model_name="other"),
        pod("e", role="decode", pool="h100", phase="Pending", scheduled=False, age=121),
        pod("f", pool="b200", phase="Pending", scheduled=False, age=900, deleting=True),
    ]
    assert pending_pods(pods, m, NOW) == {"prefill": {"b200": 1, "h100": 0},
                                          "decode": {"b200": 0, "h100": 1}}


def test_pods_to_drain_prefers_unscheduled_unready_idle_young():
    pods = [pod("old-busy", age=900), pod("young-busy", age=100),
            pod("old-idle", age=800), pod("unready", age=700, ready=False),
            pod("stuck", age=600, phase="Pending", scheduled=False, ready=False)]
    load = {"old-busy": 12.0, "young-busy": 9.0, "old-idle": 0.0}
    assert pods_to_drain(pods, 3, load) == ["stuck", "unready", "old-idle"]
    assert pods_to_drain(pods, 5, load)[3:] == ["young-busy", "old-busy"]
    # without per-pod load every ready pod counts as idle: the youngest goes first
    assert pods_to_drain(pods[:3], 2, {}) == ["young-busy", "old-idle"]
    assert pods_to_drain(pods, 0, load) == []


def test_rate_window_setting(monkeypatch):
    monkeypatch.delenv(RATE_WINDOW_ENV, raising=False)
    assert min_rate_window_seconds() == 60
    monkeypatch.setenv(RATE_WINDOW_ENV, "20")
    assert min_rate_window_seconds() == 20
    monkeypatch.setenv(RATE_WINDOW_ENV, "1s")
    with pytest.raises(ValueError, match=RATE_WINDOW_ENV):
        min_rate_window_seconds()


def test_attainment_from_buckets_matches_the_observations():
    rng = np.random.default_rng(11)
    values = rng.lognormal(np.log(0.8), 0.7, 5000)
    edges = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf]
    buckets = [(le, float(np.sum(values <= le))) for le in edges]
    rng.shuffle(buckets)  # Prometheus returns them in any order
    for target in (0.25, 1.0, 2.0):  # on an edge: exact
        assert attainment_from_buckets(buckets, target) == pytest.approx(
            np.mean(values <= target))
    # between edges: linear within the bucket, so between the two edges' shares
    share = attainment_from_buckets(buckets, 1.5)
    assert np.mean(values <= 1.0) < share < np.mean(values <= 2.0)
    linear = np.mean(values <= 1.0) + 0.5 * (np.mean(values <= 2.0) - np.mean(values <= 1.0))
    assert share == pytest.approx(linear)
    # beyond the last finite edge, only what is known below it
    assert attainment_from_buckets(buckets, 10.0) == pytest.approx(np.mean(values <= 4.0))
    assert attainment_from_buckets([(0.5, 0.0), (math.inf, 0.0)], 1.0) is None
    with pytest.raises(ValueError, match="\\+Inf"):
        attainment_from_buckets([(0.5, 1.0)], 1.0)


def test_selector_quotes_labels():
    assert selector("llm", "nano", "router|prefill") == \
        '{namespace="llm",model="nano",role=~"router|prefill"}'
    assert selector("a", 'we"ird', "decode", "h100") == \
        '{namespace="a",model="we\\"ird",role="decode",pool="h100"}'


class FakeCluster:
    """Records what run_once asks of the API."""

    def __init__(self, replicas: dict[str, int], pods: list[dict]):
        self.replicas, self.pods = replicas, pods
        self.status_patches: list[dict] = []
        self.annotated: list[tuple[str, dict]] = []

    async def deployment_replicas(self, namespace, name):
        return self.replicas.get(name)

    async def model_pods(self, namespace, model_name):
        return self.pods

    async def annotate_pod(self, namespace, name, annotations):
        self.annotated.append((name, annotations))

    async def patch_model_status(self, namespace, name, status):
        self.status_patches.append(status)


async def test_run_once_holds_without_prometheus_and_clears_removed_pools():
    import logging

    from baton.operator.autoscaler.daemon import DESIRED_REPLICAS, run_once

    m = model()
    cluster = FakeCluster({"nano-prefill-b200": 2, "nano-decode-b200": 1}, [])
    # the last decision still names a pool ("a100") the spec no longer has
    last = {"prefill": {"b200": 3, "h100": 2, "a100": 1}, "decode": {"b200": 1, "h100": 0}}
    body = {"metadata": {"name": "nano", "namespace": "llm"},
            "status": {"autoscaler": {"desired": last, "held": True}}}
    state = state_from_status(body["status"])
    decision = await run_once(m, body, cluster, None, DEFAULT_PROFILE, NOW,
                              logging.getLogger("test"), state, was_held=True)
    assert decision.held
    assert decision.desired == {"prefill": {"b200": 3, "h100": 2},
                                "decode": {"b200": 1, "h100": 0}}
    [patch] = cluster.status_patches
    auto = patch["autoscaler"]
    assert auto["held"] is True and "prometheusUrl is not set" in auto["reason"]
    assert auto["desired"]["prefill"] == {"b200": 3, "h100": 2, "a100": None}
    assert decision.desired["prefill"] == {"b200": 3, "h100": 2}  # the patch is a copy
    assert DESIRED_REPLICAS.labels("llm", "nano", "prefill", "b200")._value.get() == 3
    # nothing to drain: no held size is below its Deployment's
    assert cluster.annotated == []


async def test_a_repeated_scale_down_marks_no_further_pods():
    """Until the reconcile lowers the Deployment, every round sees the same excess; pods
    marked by an earlier round count, so the ReplicaSet removes just what was decided."""
    import logging

    from baton.operator.autoscaler.daemon import DELETION_COST, DRAIN_COST, run_once

    m = model()
    marked = pod("p-old", pool="b200", age=900)
    marked["metadata"]["annotations"] = {DELETION_COST: DRAIN_COST}
    pods = [marked, pod("p-mid", pool="b200", age=600), pod("p-young", pool="b200", age=60)]
    cluster = FakeCluster({"nano-prefill-b200": 3, "nano-decode-b200": 1}, pods)
    last = {"prefill": {"b200": 1, "h100": 0}, "decode": {"b200": 1, "h100": 0}}
    body = {"metadata": {"name": "nano", "namespace": "llm"},
            "status": {"autoscaler": {"desired": last}}}
    decision = await run_once(m, body, cluster, None, DEFAULT_PROFILE, NOW,
                              logging.getLogger("test"), state_from_status(body["status"]),
                              was_held=True)
    assert decision.drain["prefill"] == {"b200": 2}
    # one was marked already: only the youngest of the others joins it
    assert cluster.annotated == [("p-young", {DELETION_COST: DRAIN_COST})]
    again = FakeCluster({"nano-prefill-b200": 3, "nano-decode-b200": 1},
                        pods[:2] + [dict(pods[2], metadata={
                            **pods[2]["metadata"], "annotations": {DELETION_COST: DRAIN_COST}})])
    await run_once(m, body, again, None, DEFAULT_PROFILE, NOW + 30, logging.getLogger("test"),
                   decision.state, was_held=True)
    assert again.annotated == []
    # the scale-down called off (the pool keeps its 3 pods): the marks are cleared
    kept = {"prefill": {"b200": 3, "h100": 0}, "decode": {"b200": 1, "h100": 0}}
    body["status"]["autoscaler"]["desired"] = kept
    off = FakeCluster({"nano-prefill-b200": 3, "nano-decode-b200": 1}, again.pods)
    await run_once(m, body, off, None, DEFAULT_PROFILE, NOW + 60, logging.getLogger("test"),
                   state_from_status(body["status"]), was_held=True)
    assert sorted(off.annotated) == [("p-old", {DELETION_COST: None}),
                                     ("p-young", {DELETION_COST: None})]


def test_scale_events_say_which_way_and_explain_each_role_that_changes():
    from baton.operator.autoscaler.daemon import scale_event

    m = model()
    busy = Observation(request_rate=20, prompt_tokens_per_second=120000,
                       generation_tokens_per_second=4000, prefill_waiting=0,
                       decode_running=60, decode_waiting=0, ttft_attainment=1.0,
                       itl_attainment=1.0, mean_itl_seconds=0.02, arrival_rate=20)
    small = {"prefill": {"b200": 1, "h100": 0}, "decode": {"b200": 1, "h100": 0}}
    up = decide(m.spec, busy, small, {}, PolicyState(), NOW, DEFAULT_PROFILE)
    kind, message = scale_event(up, small)
    assert kind == "ScaledUp"
    # only prefill grows: the message is prefill's explanation alone
    assert up.desired["decode"] == small["decode"]
    assert message == up.explanations["prefill"]
    assert message.startswith("prefill b200 1 -> ") and "120k prompt tokens/s" in message
    assert "arrivals 20/s" in message and "decode" not in message
    # a shrink after the window is ScaledDown; both directions at once are Scaled
    idle = Observation(request_rate=1, prompt_tokens_per_second=6000,
                       generation_tokens_per_second=2000, prefill_waiting=0,
                       decode_running=10, decode_waiting=0, ttft_attainment=1.0,
                       itl_attainment=1.0, arrival_rate=1)
    later = NOW + m.spec.autoscaling.scale_down_stabilization_seconds + 1
    down = decide(m.spec, idle, up.desired, {}, replace(up.state, observing_since=NOW - 1e4),
                  later, DEFAULT_PROFILE)
    assert scale_event(down, up.desired)[0] == "ScaledDown"
    mixed = replace(down, desired={"prefill": down.desired["prefill"],
                                   "decode": {"b200": 2, "h100": 0}})
    assert scale_event(mixed, up.desired)[0] == "Scaled"
    # nothing changes, or metrics are missing: no Event (the latter has its own)
    same = decide(m.spec, busy, up.desired, {}, up.state, NOW + 30, DEFAULT_PROFILE)
    assert not same.changed and scale_event(same, up.desired) is None
    held = decide(m.spec, None, small, {}, up.state, NOW + 30, DEFAULT_PROFILE, "down")
    assert held.held and scale_event(held, small) is None


async def test_marking_a_pod_the_replica_set_just_removed_is_no_failure():
    from baton.operator.autoscaler.daemon import KubernetesCluster
    from baton.operator.kube import ApiError

    class GoneOrBroken:
        def __init__(self, status):
            self.status = status

        def merge_patch(self, res, namespace, name, body):
            raise ApiError(self.status, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
                           '{"message": "nope"}')

    await KubernetesCluster(GoneOrBroken(404)).annotate_pod("llm", "p", {"a": "b"})
    with pytest.raises(ApiError, match="HTTP 403"):
        await KubernetesCluster(GoneOrBroken(403)).annotate_pod("llm", "p", {"a": "b"})
