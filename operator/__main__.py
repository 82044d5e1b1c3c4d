"""`python -m baton.operator` / `baton operator`: run the Kopf operator.

    baton operator [--namespace NS ...] [--kubeconfig FILE] [--worker-image IMAGE]
                   [--liveness URL] [--metrics-port PORT] [--peering NAME] [--priority N]
                   [--require-peering | --standalone] [--resync-seconds S] [--no-scanning]

Watches every namespace unless --namespace is given. Credentials: in-cluster when running in
a pod, else the kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config). Kopf peering is on
when its object exists (the chart installs it): replicas of the same priority freeze each
other instead of acting twice (the chart runs one replica; HA replicas get distinct
priorities, the highest one acts). Without the object the operator runs standalone and says
so, or with --require-peering waits for it and says what it waits for
(baton.operator.peering).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_PEERING = "baton"
WORKER_IMAGE_ENV = "BATON_WORKER_IMAGE"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="baton operator", description=__doc__.split("\n")[0])
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--worker-image", default=os.environ.get(WORKER_IMAGE_ENV, ""),
                        help=f"worker image for Models without spec.image "
                             f"(default: ${WORKER_IMAGE_ENV})")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL ('' to disable)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="port of the operator's /metrics (0 to disable)")
    parser.add_argument("--peering", default=DEFAULT_PEERING,
                        help="Kopf peering object name (KopfPeering per namespace, or "
                             "ClusterKopfPeering when watching all namespaces)")
    parser.add_argument("--priority", type=int, default=0,
                        help="peering priority: with several replicas the highest one acts")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--require-peering", action="store_true",
                      help="when the peering object is missing, wait for it (saying so) "
                           "instead of running standalone; for several replicas")
    mode.add_argument("--standalone", action="store_true",
                      help="run without Kopf peering (only ever one operator replica)")
    parser.add_argument("--resync-seconds", type=float, default=60.0,
                        help="periodic full reconcile of every Model")
    parser.add_argument("--no-scanning", dest="scanning", action="store_false",
                        help="do not watch CustomResourceDefinitions and namespaces (no "
                             "cluster-wide reads; the namespaces given must exist)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.resync_seconds <= 0:
        parser.error(f"--resync-seconds must be > 0, got {args.resync_seconds}")
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # One line per handled watch event is noise; the reconcile logs what it changed.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        # Kopf's own login and the autoscaler's client read the same file.
        os.environ["KUBECONFIG"] = args.kubeconfig

    import kopf
    from kubernetes.config import ConfigException
    from prometheus_client import start_http_server
    from urllib3.exceptions import HTTPError

    # Importing the autoscaler registers its per-Model daemon with Kopf.
    import baton.operator.autoscaler.daemon  # noqa: F401
    from baton.operator import handlers
    from baton.operator.kube import ApiError, Kube
    from baton.operator.metrics import record_build_info
    from baton.operator.reconcile import Reconciler

    try:
        kube = Kube.from_config(args.kubeconfig)
    except (ConfigException, OSError) as exc:
        print(f"baton operator: no Kubernetes credentials: not in a pod, and the kubeconfig "
              f"({args.kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}) "
              f"could not be used: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("baton.operator")
    try:
        peering = choose_peering(kube, args, log)
    except (ApiError, HTTPError, OSError) as exc:
        # Kopf retries the API on its own; peering stays on as it would without the check
        peering = args.peering
        log.warning(f"Could not look for the peering object ({exc}); peering stays on: "
                    f"until {args.peering!r} exists (KopfPeering per watched namespace, "
                    f"ClusterKopfPeering when watching all), nothing is reconciled.")
    reconciler = Reconciler(kube, args.worker_image, handlers.post_event, log)
    handlers.register(reconciler, resync_seconds=args.resync_seconds, scanning=args.scanning)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    record_build_info()
    if not args.worker_image:
        log.warning("No worker image configured (--worker-image or $%s): only Models with "
                    "spec.image can run.", WORKER_IMAGE_ENV)
    # Kopf pauses for good when given a peering name it cannot use: standalone gets none
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace,
             liveness_endpoint=args.liveness or None,
             peering_name=None if peering is None else args.peering,
             priority=args.priority, standalone=peering is None)
    return 0


def choose_peering(kube, args: argparse.Namespace, log: logging.Logger):
    """The peering objects to coordinate through, or None to run standalone; says which,
    and what to do when the objects are missing (module docstring of baton.operator.peering).
    """
    from baton.operator.peering import (
        PeeringWait,
        how_to_create,
        missing_peerings,
        peering_objects,
    )

    if args.standalone:
        log.info("Peering is off (--standalone): run only one operator replica.")
        return None
    objects = peering_objects(args.peering, args.namespace)
    absent, crds = missing_peerings(kube, objects)
    names = ", ".join(o.describe() for o in absent)
    if not absent:
        log.info(f"Peering through {', '.join(o.describe() for o in objects)} with priority "
                 f"{args.priority}.")
        return objects
    if args.require_peering:
        log.warning(f"Waiting for {names} (--require-peering): nothing is reconciled until "
                    f"it exists. Create it: {how_to_create(absent, crds)}")
        PeeringWait(kube, objects, log).start()
        return objects
    log.warning(f"No {names}: running standalone, without peering. A second operator "
                f"replica would act on the same Models; to run several, create it and start "
                f"them with --require-peering: {how_to_create(absent, crds)}")
    return None


if __name__ == "__main__":
    sys.exit(main())
