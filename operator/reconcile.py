"""The level-based reconcile: make the cluster hold exactly what the Model's builders say.

One entry point, `Reconciler.reconcile(namespace, name)`, serves every trigger (the Model
created, changed or seen again at start-up, an owned Deployment changed, the periodic resync):
it reads the Model fresh, builds the desired objects, creates or applies what differs,
deletes owned objects no longer desired (a removed pool), and writes status only when it
changes. Already-exists and conflicts count as success: the next trigger converges anyway.

An invalid spec is reported once per generation (Ready=False, reason InvalidSpec, naming the
field) and never retried: retrying cannot fix it, the user's next edit will trigger again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from baton.operator.builders import (
    MANAGED_BY,
    SPEC_HASH_ANNOTATION,
    certs_secret,
    certs_secret_name,
    desired_objects,
    stable_hash,
)
from baton.operator.certs import CertificateAuthority
from baton.operator.fields import SpecError
from baton.operator.kube import ApiError, Kube, Resource, resource_of
from baton.operator.metrics import RECONCILE_SECONDS, RECONCILES
from baton.operator.spec import GROUP, PLURAL, VERSION, Model
from baton.operator.status import (
    invalid_spec_status,
    model_status,
    now_rfc3339,
    owned_status,
    status_changed,
)

MODELS = Resource(f"{GROUP}/{VERSION}", PLURAL)
SECRETS = Resource("v1", "secrets")
PODS = Resource("v1", "pods")
# Every kind the builders may produce, so that one no longer desired is found and deleted.
OWNED_KINDS = [
    ("ConfigMap", "v1"), ("Service", "v1"), ("Deployment", "apps/v1"),
    ("PodDisruptionBudget", "policy/v1"), ("NetworkPolicy", "networking.k8s.io/v1"),
]
POD_MONITOR = ("PodMonitor", "monitoring.coreos.com/v1")
MONITORING_RECHECK_SECONDS = 300.0

# (event type "Normal" | "Warning", reason, message) -> posts a Kubernetes Event on the Model
EventSink = Callable[[dict, str, str, str], None]


@dataclass
class Outcome:
    """What one reconcile did (for logs and tests)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    invalid: str | None = None


class Reconciler:
    def __init__(self, kube: Kube, worker_image: str, post_event: EventSink,
                 logger: logging.Logger | None = None):
        self.kube = kube
        self.worker_image = worker_image
        self.post_event = post_event
        self.logger = logger or logging.getLogger("baton.operator")
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._monitoring: tuple[float, bool] | None = None

    def has_monitoring_api(self) -> bool:
        """Whether monitoring.coreos.com/v1 podmonitors exist (re-checked every few minutes:
        the Prometheus operator may be installed after baton)."""
        now = time.monotonic()
        if self._monitoring is None or now - self._monitoring[0] > MONITORING_RECHECK_SECONDS:
            self._monitoring = (now, self.kube.has_api("monitoring.coreos.com/v1",
                                                       "podmonitors"))
        return self._monitoring[1]

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """Converges one Model; None when it is gone or being deleted."""
        with self._lock(namespace, name):
            started = time.perf_counter()
            try:
                return self._reconcile(namespace, name)
            finally:
                RECONCILE_SECONDS.observe(time.perf_counter() - started)

    def _reconcile(self, namespace: str, name: str) -> Outcome | None:
        body = self.kube.get(MODELS, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        body.setdefault("metadata", {}).setdefault("namespace", namespace)
        previous = owned_status(body.get("status"))
        generation = int(body["metadata"].get("generation") or 0)
        try:
            model = Model.from_resource(body)
            objects = desired_objects(model, has_monitoring_api=self.has_monitoring_api(),
                                      operator_image=self.worker_image)
        except SpecError as error:
            RECONCILES.labels("invalid").inc()
            return self._report_invalid(body, error, generation, previous)

        outcome = Outcome()
        self._ensure_certs(model, outcome)
        existing = self._owned_objects(model)
        desired_keys = set()
        for obj in objects:
            key = (obj["kind"], obj["metadata"]["name"])
            desired_keys.add(key)
            self._converge(model, body, obj, existing.get(key), outcome)
        for key, obj in existing.items():
            if key not in desired_keys and self._owned_by(obj, model):
                self._delete(model, body, obj, outcome)

        # Listed again: the status reports what the cluster holds after this pass.
        deployments = list(self._owned_objects(model, kinds=[("Deployment", "apps/v1")])
                           .values())
        pods = self._pods_if_short(model, deployments)
        status = model_status(model, deployments, previous, now_rfc3339(), pods)
        if status_changed(previous, status):
            self.kube.merge_patch(MODELS, namespace, name, {"status": status},
                                  subresource="status")
            outcome.status_written = True
        RECONCILES.labels("converged").inc()
        return outcome

    def _ensure_certs(self, model: Model, outcome: Outcome) -> None:
        """Under mutual TLS, the Model's CA and role certificates: made once when absent (an
        existing Secret is kept as it is; a pod cannot start before it exists)."""
        if model.spec.security.transport != "mtls":
            return
        name = certs_secret_name(model)
        if self.kube.get(SECRETS, model.namespace, name) is not None:
            return
        secret = certs_secret(model, CertificateAuthority.create(
            f"baton {model.namespace}/{model.name} CA"))
        try:
            self.kube.create(SECRETS, model.namespace, secret)
        except ApiError as error:
            if error.status != 409:  # another pass made it first: keep that one
                raise
            return
        outcome.created.append(f"Secret/{name}")
        self.logger.info(f"Model {model.namespace}/{model.name}: made its CA and role "
                         f"certificates (Secret {name})")

    def _pods_if_short(self, model: Model, deployments: list[dict]) -> list[dict]:
        """The Model's pods, read only when some Deployment lacks ready replicas (to say why
        in the Degraded condition); the common, healthy case costs no pod listing."""
        short = any(int((d.get("status") or {}).get("readyReplicas") or 0)
                    < int((d.get("spec") or {}).get("replicas") or 0) for d in deployments)
        if not short:
            return []
        return self.kube.list(PODS, model.namespace, {"baton.dev/model": model.name})

    def _report_invalid(self, body: dict, error: SpecError, generation: int,
                        previous: dict) -> Outcome:
        meta = body["metadata"]
        status = invalid_spec_status(error, generation, previous, now_rfc3339())
        outcome = Outcome(invalid=str(error))
        if status_changed(previous, status):
            self.kube.merge_patch(MODELS, meta["namespace"], meta["name"], {"status": status},
                                  subresource="status")
            outcome.status_written = True
            self.post_event(body, "Warning", "InvalidSpec", str(error))
            self.logger.warning(f"Model {meta['namespace']}/{meta['name']} generation "
                                f"{generation} was rejected: {error}")
        return outcome

    def _kinds(self) -> list[tuple[str, str]]:
        return OWNED_KINDS + ([POD_MONITOR] if self.has_monitoring_api() else [])

    def _owned_objects(self, model: Model,
                       kinds: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], dict]:
        found: dict[tuple[str, str], dict] = {}
        for kind, api_version in kinds or self._kinds():
            res = resource_of(kind, api_version)
            for obj in self.kube.list(res, model.namespace, {"baton.dev/model": model.name,
                                                             "app.kubernetes.io/managed-by":
                                                                 MANAGED_BY}):
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", api_version)
                found[(kind, obj["metadata"]["name"])] = obj
        return found

    @staticmethod
    def _owned_by(obj: dict, model: Model) -> bool:
        return any(ref.get("uid") == model.uid and ref.get("controller")
                   for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])

    def _converge(self, model: Model, body: dict, obj: dict, current: dict | None,
                  outcome: Outcome) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        res = resource_of(kind, obj["apiVersion"])
        # Records which desired state was applied last (for people reading the object).
        obj["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = stable_hash(obj)
        if current is None:
            current = self.kube.get(res, model.namespace, name)
        if current is not None:
            refs = (current.get("metadata") or {}).get("ownerReferences") or []
            foreign = [r for r in refs if r.get("controller") and r.get("uid") != model.uid]
            if foreign:
                message = (f"{kind} {name} exists and is controlled by "
                           f"{foreign[0].get('kind')} {foreign[0].get('name')}; left alone")
                self.post_event(body, "Warning", "NameConflict", message)
                self.logger.warning(message)
                return
            if is_subset(obj, current):
                return
            self._apply(res, model, obj)
            outcome.updated.append(f"{kind}/{name}")
            self.post_event(body, "Normal", "Updated", f"Updated {kind} {name}")
            self.logger.info(f"Updated {kind} {model.namespace}/{name}.")
            return
        try:
            self.kube.create(res, model.namespace, obj)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # Created meanwhile (a concurrent trigger or a replayed watch): converge it.
            self._apply(res, model, obj)
        outcome.created.append(f"{kind}/{name}")
        self.post_event(body, "Normal", "Created", f"Created {kind} {name}")
        self.logger.info(f"Created {kind} {model.namespace}/{name}.")

    def _apply(self, res: Resource, model: Model, obj: dict) -> None:
        try:
            self.kube.apply(res, model.namespace, obj)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # A conflict with another writer: the next trigger re-applies from fresh state.
            self.logger.info(f"Conflict applying {obj['kind']} {obj['metadata']['name']}; "
                             f"it will be retried by the next reconcile: {exc.message}")

    def _delete(self, model: Model, body: dict, obj: dict, outcome: Outcome) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if self.kube.delete(resource_of(kind, obj["apiVersion"]), model.namespace, name):
            outcome.deleted.append(f"{kind}/{name}")
            self.post_event(body, "Normal", "Deleted", f"Deleted {kind} {name}: no longer in "
                                                       f"the spec")
            self.logger.info(f"Deleted {kind} {model.namespace}/{name}: no longer desired.")


def is_subset(desired: Any, live: Any) -> bool:
    """Whether `live` holds every field of `desired` with the same value.

    Fields the API server or other controllers add (defaults, status, managedFields) do not
    matter; a field the operator sets that someone changed (`kubectl scale`, an edit) does,
    so the reconcile puts it back. Lists must match item by item.
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            key in live and is_subset(value, live[key]) for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(desired) == len(live)
                and all(is_subset(d, v) for d, v in zip(desired, live)))
    return desired == live


def owner_model(obj: Any) -> tuple[str, str] | None:
    """(namespace, name) of the Model that controls `obj`, if any."""
    meta = (obj or {}).get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if (ref.get("controller") and ref.get("kind") == "Model"
                and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")):
            return meta.get("namespace") or "default", ref.get("name")
    return None
