"""The reconcile against an in-memory API (edge cases the kmock process test cannot force)."""

from __future__ import annotations

import copy

import pytest

from baton.operator.kube import ApiError, Resource
from baton.operator.reconcile import MODELS, Reconciler

UID = "uid-1"


class FakeKube:
    """Objects by (plural, namespace, name); apply and merge_patch merge like kmock does."""

    def __init__(self, monitoring: bool = False):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.monitoring = monitoring
        self.create_conflicts: set[str] = set()

    def _key(self, res: Resource, ns, name):
        return (res.plural, ns, name)

    def get(self, res, ns, name):
        self.calls.append(("get", res.plural, name))
        obj = self.objects.get(self._key(res, ns, name))
        return copy.deepcopy(obj)

    def list(self, res, ns, labels=None):
        self.calls.append(("list", res.plural, ""))
        return [copy.deepcopy(o) for (plural, n, _), o in self.objects.items()
                if plural == res.plural and n == ns
                and all((o["metadata"].get("labels") or {}).get(k) == v
                        for k, v in (labels or {}).items())]

    def create(self, res, ns, body):
        self.calls.append(("create", res.plural, body["metadata"]["name"]))
        name = body["metadata"]["name"]
        if name in self.create_conflicts:
            self.create_conflicts.discard(name)
            self.objects[self._key(res, ns, name)] = {"metadata": {"name": name}}
            raise ApiError(409, "POST", res.path(ns), '{"message": "already exists"}')
        self.objects[self._key(res, ns, name)] = copy.deepcopy(body)
        return body

    def apply(self, res, ns, body):
        self.calls.append(("apply", res.plural, body["metadata"]["name"]))
        self.objects[self._key(res, ns, body["metadata"]["name"])] = copy.deepcopy(body)
        return body

    def merge_patch(self, res, ns, name, body, subresource=None):
        self.calls.append(("patch/" + (subresource or ""), res.plural, name))
        obj = self.objects[self._key(res, ns, name)]
        for key, value in body.items():
            if isinstance(value, dict):
                obj.setdefault(key, {}).update(copy.deepcopy(value))
            else:
                obj[key] = copy.deepcopy(value)
        return obj

    def delete(self, res, ns, name):
        self.calls.append(("delete", res.plural, name))
        return self.objects.pop(self._key(res, ns, name), None) is not None

    def has_api(self, group_version, plural):
        return self.monitoring


def add_model(kube: FakeKube, spec_overrides=None, generation=1, status=None) -> dict:
    spec = {"source": {"uri": "pvc://store/nano"},
            "prefill": {"pools": [{"name": "b"}, {"name": "h"}]},
            "decode": {"pools": [{"name": "h"}]}}
    spec.update(spec_overrides or {})
    body = {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": "nano", "namespace": "llm", "uid": UID,
                         "generation": generation}, "spec": spec}
    if status:
        body["status"] = status
    kube.objects[(MODELS.plural, "llm", "nano")] = body
    return body


@pytest.fixture
def events():
    return []


def reconciler(kube, events) -> Reconciler:
    return Reconciler(kube, "img:1", lambda body, t, r, m: events.append((t, r, m)))


def names(kube, plural):
    return {n for (p, _, n) in kube.objects if p == plural}


def test_create_then_idempotent(events):
    kube = FakeKube()
    add_model(kube)
    rec = reconciler(kube, events)
    first = rec.reconcile("llm", "nano")
    assert len(first.created) == 13 and first.status_written
    assert first.created[0] == "Secret/nano-certs"  # before any pod that mounts it
    assert names(kube, "deployments") == {"nano-prefill-b", "nano-prefill-h", "nano-decode-h",
                                          "nano-router"}
    kube.calls.clear()
    events.clear()
    second = rec.reconcile("llm", "nano")
    assert (second.created, second.updated, second.deleted) == ([], [], [])
    assert not second.status_written
    assert not [c for c in kube.calls if c[0] not in ("get", "list")]
    assert events == []


def test_certificates_are_made_once_and_plaintext_is_reported(events):
    import base64

    from baton.operator.certs import ROLES, cert_roles
    from baton.workers.security import Identity

    kube = FakeKube()
    add_model(kube)
    rec = reconciler(kube, events)
    rec.reconcile("llm", "nano")
    secret = kube.objects[("secrets", "llm", "nano-certs")]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == UID
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", *(f"{r}.{e}" for r in ROLES for e in ("crt", "key"))}
    for role in ROLES:
        assert cert_roles(data[f"{role}.crt"]) == {role}
    # The files load as each role's identity (what a pod's mount holds).
    for role in ROLES:
        Identity(role, data["ca.crt"], data[f"{role}.crt"], data[f"{role}.key"]
                 ).server_credentials()
    # A later pass keeps the Secret as it is (the pods trust this CA).
    rec.reconcile("llm", "nano")
    assert kube.objects[("secrets", "llm", "nano-certs")] == secret
    status = kube.objects[("models", "llm", "nano")]["status"]
    transport = next(c for c in status["conditions"] if c["type"] == "TransportSecure")
    assert (transport["status"], transport["reason"]) == ("True", "MutualTLS")

    plain = FakeKube()
    add_model(plain, {"security": {"transport": "plaintext"}})
    reconciler(plain, events).reconcile("llm", "nano")
    assert names(plain, "secrets") == set()
    status = plain.objects[("models", "llm", "nano")]["status"]
    transport = next(c for c in status["conditions"] if c["type"] == "TransportSecure")
    assert (transport["status"], transport["reason"]) == ("False", "PlaintextOptOut")
    assert "spec.security.transport is plaintext" in transport["message"]


def test_already_exists_is_success(events):
    kube = FakeKube()
    add_model(kube)
    kube.create_conflicts.add("nano-decode-h")  # created by someone between get and create
    outcome = reconciler(kube, events).reconcile("llm", "nano")
    assert "Deployment/nano-decode-h" in outcome.created
    assert ("apply", "deployments", "nano-decode-h") in kube.calls
    assert kube.objects[("deployments", "llm", "nano-decode-h")]["spec"]["replicas"] == 1


def test_removed_pool_deleted_and_foreign_objects_left_alone(events):
    kube = FakeKube()
    add_model(kube)
    rec = reconciler(kube, events)
    rec.reconcile("llm", "nano")
    # an object with our labels but controlled by something else is never deleted
    kube.objects[("deployments", "llm", "nano-prefill-x")] = {
        "metadata": {"name": "nano-prefill-x", "labels": {
            "baton.dev/model": "nano", "app.kubernetes.io/managed-by": "baton-operator"},
            "ownerReferences": [{"uid": "other", "controller": True, "kind": "Model"}]}}
    add_model(kube, {"prefill": {"pools": [{"name": "b"}]}}, generation=2)
    outcome = rec.reconcile("llm", "nano")
    assert set(outcome.deleted) == {"Deployment/nano-prefill-h",
                                    "PodDisruptionBudget/nano-prefill-h"}
    assert "nano-prefill-x" in names(kube, "deployments")
    assert ("Normal", "Deleted", "Deleted Deployment nano-prefill-h: no longer in the spec") \
        in events


def test_name_taken_by_another_controller_is_reported_not_overwritten(events):
    kube = FakeKube()
    add_model(kube)
    kube.objects[("configmaps", "llm", "nano-config")] = {"metadata": {
        "name": "nano-config", "ownerReferences": [
            {"uid": "someone", "controller": True, "kind": "Thing", "name": "t"}]},
        "data": {"x": "y"}}
    reconciler(kube, events).reconcile("llm", "nano")
    assert kube.objects[("configmaps", "llm", "nano-config")]["data"] == {"x": "y"}
    assert any(r == "NameConflict" for _, r, _ in events)


def test_invalid_spec_written_once_and_nothing_built(events):
    kube = FakeKube()
    add_model(kube, {"decode": {"pools": [{"name": "h", "minReplicas": 3}]}})
    rec = reconciler(kube, events)
    for _ in range(3):
        outcome = rec.reconcile("llm", "nano")
    assert outcome.invalid.startswith("spec.decode.pools[0].maxReplicas")
    writes = [c for c in kube.calls if c[0] != "get" and c[0] != "list"]
    assert writes == [("patch/status", "models", "nano")]
    assert [r for _, r, _ in events] == ["InvalidSpec"]


def test_invalid_after_valid_keeps_running_objects(events):
    kube = FakeKube()
    add_model(kube)
    rec = reconciler(kube, events)
    rec.reconcile("llm", "nano")
    before = names(kube, "deployments")
    add_model(kube, {"source": {"uri": "./local/path"}}, generation=2,
              status=kube.objects[(MODELS.plural, "llm", "nano")]["status"])
    outcome = rec.reconcile("llm", "nano")
    assert outcome.invalid.startswith("spec.source.uri")
    assert names(kube, "deployments") == before
    ready = [c for c in kube.objects[(MODELS.plural, "llm", "nano")]["status"]["conditions"]
             if c["type"] == "Ready"][0]
    assert ready["reason"] == "InvalidSpec" and ready["observedGeneration"] == 2


def test_monitoring_api_adds_pod_monitor(events):
    kube = FakeKube(monitoring=True)
    add_model(kube)
    reconciler(kube, events).reconcile("llm", "nano")
    assert names(kube, "podmonitors") == {"nano"}


def test_api_errors_propagate_and_deleted_model_is_a_no_op(events):
    kube = FakeKube()
    assert reconciler(kube, events).reconcile("llm", "nano") is None  # no such Model
    add_model(kube)
    kube.objects[(MODELS.plural, "llm", "nano")]["metadata"]["deletionTimestamp"] = "now"
    assert reconciler(kube, events).reconcile("llm", "nano") is None
    del kube.objects[(MODELS.plural, "llm", "nano")]["metadata"]["deletionTimestamp"]

    def broken(*_args, **_kwargs):
        raise ApiError(503, "POST", "/x", "unavailable")
    kube.create = broken
    with pytest.raises(ApiError, match="503"):
        reconciler(kube, events).reconcile("llm", "nano")


def test_pods_listed_only_when_a_pool_is_short(events):
    kube = FakeKube()
    add_model(kube)
    rec = reconciler(kube, events)
    rec.reconcile("llm", "nano")
    assert ("list", "pods", "") in kube.calls  # nothing is ready yet
    for (plural, _, _name), obj in kube.objects.items():
        if plural == "deployments":
            obj["status"] = {"replicas": obj["spec"]["replicas"],
                             "readyReplicas": obj["spec"]["replicas"]}
    kube.calls.clear()
    rec.reconcile("llm", "nano")
    assert ("list", "pods", "") not in kube.calls
