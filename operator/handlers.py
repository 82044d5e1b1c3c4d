"""Kopf handlers: thin adapters from watch events to one level-based reconcile.

    Model watch events (added, modified, replayed at start-up)  -> reconcile(model)
    owned Deployment events (status, deletion)                  -> reconcile(owner)
    a timer every `resync_seconds` per Model                    -> reconcile(model)

Handlers are sync: Kopf runs them in worker threads, where the blocking API client lives.
Kopf stores nothing in the Model's status (annotations only), so every status write is the
reconcile's own. `register()` adds them to Kopf's registry; `python -m baton.operator` calls it.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from baton.operator.builders import MANAGED_BY
from baton.operator.reconcile import Reconciler, owner_model
from baton.operator.spec import GROUP, PLURAL, VERSION

FINALIZER = "baton.dev/kopf-finalizer"
_registered: set[int] = set()


def post_event(body: dict, type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the Model, through Kopf's event queue."""
    kopf.event(body, type=type_, reason=reason, message=message[:1000])


TIMER_EXIT_POLL_SECONDS = 1.0


def configure_kopf(settings: kopf.OperatorSettings, scanning: bool = True) -> None:
    settings.persistence.finalizer = FINALIZER
    # Scanning watches CRDs and namespaces cluster-wide; without it Kopf takes the resources
    # and the given namespaces as they are at start-up.
    settings.scanning.disabled = not scanning
    # Progress and the diff base go to annotations, never to status: the status subresource
    # holds only what the reconcile and the autoscaler write.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="baton.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="baton.dev", key="last-handled-configuration")
    # Kopf turns its object log lines at this level and above into Events; "handler
    # succeeded" on every watch event would flood them. The reconcile posts its own Events.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # A deleted Model keeps Kopf's finalizer until its resync timer has stopped. The timer's
    # reconcile is synchronous (a thread, which nothing can cancel): when the delete lands
    # while one runs, Kopf looks again after cancellation_polling, 60 s by default, and the
    # Model's deletion hung for that minute. The reconcile takes well under a second.
    settings.background.cancellation_polling = TIMER_EXIT_POLL_SECONDS


def register(reconciler: Reconciler, resync_seconds: float = 60.0,
             registry: kopf.OperatorRegistry | None = None,
             scanning: bool = True) -> kopf.OperatorRegistry:
    """Registers the handlers in `registry` (default: Kopf's global one), once per registry.

    In-process tests pass a fresh `kopf.OperatorRegistry()` and hand it to `kopf.operator`.
    """
    registry = registry if registry is not None else kopf.get_default_registry()
    if id(registry) in _registered:
        raise RuntimeError("baton.operator.handlers.register() was already called for this "
                           "registry")
    _registered.add(id(registry))

    @kopf.on.startup(id="configure", registry=registry)
    def startup(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
        configure_kopf(settings, scanning)
        logger.info(f"baton operator started; worker image {reconciler.worker_image!r}, "
                    f"resync every {resync_seconds:g}s.")

    @kopf.on.event(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    def model_event(event: dict, body: kopf.Body, **_: Any) -> None:
        namespace, name = body.metadata.namespace or "default", body.metadata.name
        if event.get("type") == "DELETED":
            reconciler.forget(namespace, name)
            return
        reconciler.reconcile(namespace, name)

    @kopf.timer(GROUP, VERSION, PLURAL, interval=resync_seconds, initial_delay=resync_seconds,
                id="resync", registry=registry)
    def resync(body: kopf.Body, **_: Any) -> None:
        reconciler.reconcile(body.metadata.namespace or "default", body.metadata.name)

    @kopf.on.event("apps", "v1", "deployments",
                   labels={"app.kubernetes.io/managed-by": MANAGED_BY},
                   id="owned-deployment", registry=registry)
    def owned_deployment_event(body: kopf.Body, **_: Any) -> None:
        owner = owner_model(dict(body))
        if owner is not None:
            reconciler.reconcile(*owner)

    return registry
