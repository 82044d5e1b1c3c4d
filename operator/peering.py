"""Kopf peering for `baton operator`: the object replicas coordinate through, whether it
exists, and what the operator says when it does not.

Kopf given a peering name pauses every handler until that object exists, and says so only
at debug level: an operator started without the object the chart installs would wait
silently forever. `baton operator` looks for it before it starts Kopf:
- found: peering on (of several replicas the highest priority acts, equal ones freeze);
- missing (default): run standalone, warning what is missing, what standalone means (a
  second replica would act on the same Models) and how to create it;
- missing with --require-peering: say at start-up what it waits for and how to create it,
  repeat that every minute while waiting, and say when it appeared (Kopf then resumes by
  itself: it watches the peering resource);
- --standalone: peering off, nothing looked up.
Watching all namespaces peers through a ClusterKopfPeering, watching some namespaces through
a KopfPeering in each of them (Kopf's own rule).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from baton.operator.kube import Kube, Resource

__all__ = ["PeeringObject", "peering_objects", "missing_peerings", "how_to_create",
           "PeeringWait", "CRD_FILE"]

GROUP_VERSION = "kopf.dev/v1"
CLUSTER_PEERINGS = Resource(GROUP_VERSION, "clusterkopfpeerings", namespaced=False)
NAMESPACED_PEERINGS = Resource(GROUP_VERSION, "kopfpeerings")
CRD_FILE = "charts/baton/crds/kopf-peering.yaml"
"""Kopf's peering CRDs, as the chart installs them."""


@dataclass(frozen=True)
class PeeringObject:
    """One peering object Kopf coordinates through."""

    name: str
    namespace: str | None
    """None: the ClusterKopfPeering of an operator watching all namespaces."""

    @property
    def kind(self) -> str:
        return "ClusterKopfPeering" if self.namespace is None else "KopfPeering"

    @property
    def resource(self) -> Resource:
        return CLUSTER_PEERINGS if self.namespace is None else NAMESPACED_PEERINGS

    def describe(self) -> str:
        where = "" if self.namespace is None else f" in namespace {self.namespace!r}"
        return f"{self.kind} {self.name!r}{where}"

    def manifest(self) -> dict:
        metadata = {"name": self.name}
        if self.namespace is not None:
            metadata["namespace"] = self.namespace
        return {"apiVersion": GROUP_VERSION, "kind": self.kind, "metadata": metadata}


def peering_objects(name: str, namespaces: list[str]) -> list[PeeringObject]:
    """The objects an operator watching `namespaces` (empty: all) peers through."""
    if not namespaces:
        return [PeeringObject(name, None)]
    return [PeeringObject(name, ns) for ns in dict.fromkeys(namespaces)]


def missing_peerings(kube: Kube, objects: list[PeeringObject]) -> tuple[list[PeeringObject],
                                                                        bool]:
    """(the objects that do not exist, whether Kopf's peering CRDs are served at all).
    ApiError when the API server cannot be asked (unreachable, forbidden)."""
    served = {o.resource.plural for o in objects
              if kube.has_api(GROUP_VERSION, o.resource.plural)}
    absent = [o for o in objects if o.resource.plural not in served
              or kube.get(o.resource, o.namespace, o.name) is None]
    return absent, len(served) == len({o.resource.plural for o in objects})


def how_to_create(objects: list[PeeringObject], crds_served: bool) -> str:
    """Commands that create the objects (and the CRDs first, when they are missing)."""
    steps = [] if crds_served else [f"kubectl apply -f {CRD_FILE}"]
    steps += [f"kubectl apply -f - <<< '{json.dumps(o.manifest())}'" for o in objects]
    text = "; ".join(steps)
    return f"{text} (or install the chart with peeringCreate=true)"


class PeeringWait:
    """While an operator that requires peering waits for its objects: a warning every
    `remind_seconds`, and a line when they all exist. Runs on a daemon thread (the sync API
    client), polling every `poll_seconds`."""

    def __init__(self, kube: Kube, objects: list[PeeringObject], logger: logging.Logger, *,
                 poll_seconds: float = 5.0, remind_seconds: float = 60.0):
        self.kube, self.objects, self.logger = kube, objects, logger
        self.poll_seconds, self.remind_seconds = poll_seconds, remind_seconds
        self.found = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peering-wait", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        last_said = time.monotonic()
        while True:
            time.sleep(self.poll_seconds)
            try:
                absent, crds = missing_peerings(self.kube, self.objects)
            except Exception as exc:  # the API may be away for a while; keep waiting
                self.logger.warning(f"Could not look for the peering object: {exc}")
                continue
            if not absent:
                self.logger.info(
                    f"Found {', '.join(o.describe() for o in self.objects)}: peering is on "
                    "and the operator resumes.")
                self.found.set()
                return
            if time.monotonic() - last_said >= self.remind_seconds:
                self.logger.warning(
                    f"Still waiting for {', '.join(o.describe() for o in absent)} "
                    f"(--require-peering): nothing is reconciled until it exists. Create it: "
                    f"{how_to_create(absent, crds)}")
                last_said = time.monotonic()
