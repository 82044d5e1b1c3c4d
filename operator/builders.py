"""Pure builders: a Model -> the Kubernetes objects it should own.

`desired_objects(model, has_monitoring_api=..., operator_image=...)` returns plain dicts; the
reconcile makes the cluster match them. Nothing here talks to the API server, so every object
can be checked in a unit test.

Per Model `m` in namespace `ns`:
    ConfigMap   m-config              the WorkerConfig JSON (worker-config.json)
    Deployment  m-<role>-<pool>       one per (role, pool): `baton worker <role> --pool <pool>`
    Service     m-prefill, m-decode   headless, for worker discovery by the router
    Deployment  m-router, Service m-router (ClusterIP, the endpoint)
    PodDisruptionBudget  one per worker pool and one for the router
    PodMonitor  m                     when monitoring.coreos.com exists (else scrape annotations)
    NetworkPolicy m-workers           when spec.networkPolicy.enabled
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from baton.operator.certs import ROLES as CERT_ROLES
from baton.operator.certs import CertificateAuthority
from baton.operator.fields import SpecError
from baton.operator.spec import (
    API_KEYS_DIR,
    API_KEYS_SECRET_KEY,
    GROUP,
    KIND,
    ROLES,
    VERSION,
    Model,
    PoolSpec,
    worker_config,
)

MANAGED_BY = "baton-operator"
CONFIG_DIR = "/etc/baton"
CONFIG_FILE = "worker-config.json"
MODEL_MOUNT = "/models/source"
HF_NODE_CACHE = "/var/lib/baton/hf"
GRPC_PORT = 50051
# Plaintext grpc.health.v1 only, for the kubelet's probes when the gRPC port is mutual TLS.
HEALTH_PORT = 50052
CERTS_DIR = "/etc/baton-certs"
METRICS_PORT = 9400
ROUTER_PORT = 8000
# Worker pods run as this unprivileged user; images must not need root.
RUN_AS_USER = 1000
# Loading a large checkpoint onto GPUs can take many minutes: the startupProbe allows
# STARTUP_PERIOD_SECONDS * failureThreshold before liveness takes over.
STARTUP_PERIOD_SECONDS = 10
STARTUP_MINUTES_BASE = 20
STARTUP_MINUTES_PER_GPU = 5
# Draining finishes in-flight streams, each bounded by the request deadline; this is on top.
DRAIN_MARGIN_SECONDS = 30
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SPEC_HASH_ANNOTATION = "baton.dev/spec-hash"
CONFIG_HASH_ANNOTATION = "baton.dev/config-hash"


def object_name(model: Model, role: str, pool: str | None = None) -> str:
    """<model>-<role>[-<pool>]: the names DESIGN.md fixes."""
    return f"{model.name}-{role}" + (f"-{pool}" if pool else "")


def selector_labels(model: Model, role: str, pool: str | None = None) -> dict[str, str]:
    """The immutable part: Deployment selectors and Service selectors use only these."""
    labels = {"baton.dev/model": model.name, "baton.dev/role": role}
    if pool is not None:
        labels["baton.dev/pool"] = pool
    return labels


def standard_labels(model: Model, component: str, role: str | None = None,
                    pool: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "baton",
        "app.kubernetes.io/instance": model.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "baton.dev/model": model.name,
    }
    if role is not None:
        labels["baton.dev/role"] = role
    if pool is not None:
        labels["baton.dev/pool"] = pool
    return labels


def owner_reference(model: Model) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": model.name,
            "uid": model.uid, "controller": True, "blockOwnerDeletion": True}


def _metadata(model: Model, name: str, labels: dict[str, str]) -> dict:
    return {"name": name, "namespace": model.namespace, "labels": labels,
            "ownerReferences": [owner_reference(model)]}


def endpoint(model: Model) -> str:
    return f"http://{object_name(model, 'router')}.{model.namespace}.svc:{ROUTER_PORT}/v1"


def worker_service_address(model: Model, role: str) -> str:
    return f"{object_name(model, role)}.{model.namespace}.svc:{GRPC_PORT}"


def stable_hash(obj: Any) -> str:
    """A short content hash, stable across processes (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# pieces shared by pod templates


def _model_volume(model: Model) -> dict:
    """The checkpoint volume from spec.source (read-only)."""
    source = model.spec.source
    scheme = source.scheme
    if scheme == "pvc":
        claim = source.uri[len("pvc://"):].partition("/")[0]
        return {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    if scheme == "file":
        return {"name": "model",
                "hostPath": {"path": source.uri[len("file://"):], "type": "Directory"}}
    if scheme == "hf":
        repo = source.uri[len("hf://"):]
        if source.cache_claim:
            return {"name": "model", "persistentVolumeClaim": {"claimName": source.cache_claim,
                                                               "readOnly": True}}
        return {"name": "model",
                "hostPath": {"path": f"{HF_NODE_CACHE}/{repo}", "type": "Directory"}}
    raise SpecError("spec.source.uri", f"{source.uri!r} is a filesystem path, which only "
                                       f"`baton up` can use; in a cluster use pvc://, file:// "
                                       f"or hf://")


def _model_mount(model: Model) -> dict:
    source = model.spec.source
    mount = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
    sub_path = ""
    if source.scheme == "pvc":
        sub_path = source.uri[len("pvc://"):].partition("/")[2].strip("/")
    elif source.scheme == "hf" and source.cache_claim:
        sub_path = source.uri[len("hf://"):]
    if sub_path:
        mount["subPath"] = sub_path
    return mount


def _pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics"}


def _common_env(model: Model) -> list[dict]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The root filesystem is read-only: caches (Triton, torch, HF) go to the /tmp volume.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]


def _grpc_probe(model: Model, period: int, failures: int, timeout: int = 5) -> dict:
    # Under mutual TLS the kubelet (no certificate) probes the plaintext health-only port.
    port = HEALTH_PORT if _mtls(model) else GRPC_PORT
    return {"grpc": {"port": port}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def _mtls(model: Model) -> bool:
    return model.spec.security.transport == "mtls"


def certs_secret_name(model: Model) -> str:
    return object_name(model, "certs")


def certs_secret(model: Model, ca: CertificateAuthority) -> dict:
    """The Model's CA certificate and one certificate and key per role, issued by `ca` (whose
    key is not kept: a new CA means a new Secret, and every pod restarted with it)."""
    data = {"ca.crt": ca.cert_pem}
    for role in CERT_ROLES:
        issued = ca.issue(role)
        data[f"{role}.crt"], data[f"{role}.key"] = issued.cert, issued.key
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": _metadata(model, certs_secret_name(model),
                              standard_labels(model, "certs")),
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _security(model: Model, role: str) -> tuple[list[str], list[dict], list[dict]]:
    """(args, volumes, mounts) of transport security for a process of `role`: its own
    certificate and key and the CA certificate from the Model's Secret, or --plaintext."""
    if not _mtls(model):
        return ["--plaintext"], [], []
    items = [{"key": name, "path": name} for name in ("ca.crt", f"{role}.crt", f"{role}.key")]
    volume = {"name": "certs", "secret": {"secretName": certs_secret_name(model),
                                          "items": items, "defaultMode": 0o440}}
    mount = {"name": "certs", "mountPath": CERTS_DIR, "readOnly": True}
    args = ["--certs", CERTS_DIR]
    if role in ROLES:
        args += ["--health-port", str(HEALTH_PORT)]
    return args, [volume], [mount]


# ----------------------------------------------------------------------------------------
# objects


def config_map(model: Model) -> dict:
    cfg = worker_config(model, MODEL_MOUNT)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(model, object_name(model, "config"),
                                  standard_labels(model, "config")),
            "data": {CONFIG_FILE: cfg.to_json()}}


def worker_deployment(model: Model, role: str, pool: PoolSpec, *, has_monitoring_api: bool,
                      image: str, config_hash: str) -> dict:
    role_spec = model.spec.role(role)
    name = object_name(model, role, pool.name)
    labels = standard_labels(model, role, role, pool.name)
    gpus = role_spec.gpus_per_replica
    # Quantities as strings: the API server returns them so, and the reconcile compares.
    resources: dict[str, dict[str, Any]] = {"requests": {GPU_RESOURCE: str(gpus)},
                                            "limits": {GPU_RESOURCE: str(gpus)}}
    if pool.resources is not None:
        for key in ("cpu", "memory"):
            value = getattr(pool.resources, key)
            if value is not None:
                resources["requests"][key] = value
    node_selector = dict(pool.node_selector)
    if pool.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = pool.gpu_product
    # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule (GPU operator, managed pools).
    tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += [t.to_k8s() for t in pool.tolerations]
    volumes = [
        {"name": "config", "configMap": {"name": object_name(model, "config")}},
        _model_volume(model),
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        _model_mount(model),
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if role_spec.expert_parallel > 1:
        # NCCL and torch.distributed exchange through /dev/shm; the runtime default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": f"{2 * gpus}Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    security_args, security_volumes, security_mounts = _security(model, role)
    volumes += security_volumes
    mounts += security_mounts
    startup_minutes = STARTUP_MINUTES_BASE + STARTUP_MINUTES_PER_GPU * gpus
    template_annotations = {CONFIG_HASH_ANNOTATION: config_hash}
    if not has_monitoring_api:
        template_annotations.update(_scrape_annotations(METRICS_PORT))
    container = {
        "name": "worker",
        "image": model.spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["baton"],
        # The drain may take as long as the longest request; the pod's grace period adds
        # DRAIN_MARGIN_SECONDS on top so the kubelet never kills a draining worker.
        "args": ["worker", role, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--pool", pool.name,
                 "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
                 "--drain-seconds", str(model.spec.router.request_timeout_seconds),
                 # Prefill sends state only to this Model's decode workers (their Service).
                 *(["--decode-target", f"{object_name(model, 'decode')}.{model.namespace}.svc"]
                   if role == "prefill" else []),
                 *security_args],
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  *([{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
                    if _mtls(model) else [])],
        "env": _common_env(model) + [
            {"name": "BATON_ROLE", "value": role},
            {"name": "BATON_POOL", "value": pool.name},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        # grpc.health.v1 answers NOT_SERVING while loading and while draining. Liveness only
        # runs after the startupProbe succeeded, and the kubelet stops liveness probing once
        # the pod is being deleted, so a draining worker is not killed for being NOT_SERVING.
        "startupProbe": _grpc_probe(model, STARTUP_PERIOD_SECONDS,
                                    startup_minutes * 60 // STARTUP_PERIOD_SECONDS),
        "readinessProbe": _grpc_probe(model, 5, 2),
        "livenessProbe": _grpc_probe(model, 10, 6),
        "securityContext": _container_security_context(),
        # A crashing container's last log lines become its termination message, which the
        # operator quotes in the Degraded condition (e.g. a checkpoint the worker refused).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(model, name, labels),
        "spec": {
            "replicas": model.desired_replicas(role, pool),
            "selector": {"matchLabels": selector_labels(model, role, pool.name)},
            # GPUs are rarely spare: replace pods one at a time instead of surging.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "terminationGracePeriodSeconds":
                        model.spec.router.request_timeout_seconds + DRAIN_MARGIN_SECONDS,
                    "nodeSelector": node_selector,
                    "tolerations": tolerations,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def worker_service(model: Model, role: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(model, object_name(model, role), standard_labels(model, role,
                                                                                role)),
        "spec": {
            # Headless: the router resolves every ready worker's address from DNS.
            "clusterIP": "None",
            "selector": selector_labels(model, role),
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc",
                       "protocol": "TCP"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics",
                       "protocol": "TCP"}],
        },
    }


def router_deployment(model: Model, *, has_monitoring_api: bool, image: str,
                      config_hash: str) -> dict:
    router = model.spec.router
    labels = standard_labels(model, "router", "router")
    template_annotations = {CONFIG_HASH_ANNOTATION: config_hash}
    if not has_monitoring_api:
        template_annotations.update(_scrape_annotations(ROUTER_PORT))
    # The router tokenizes and renders chat templates itself: it reads tokenizer.json,
    # tokenizer_config.json and config.json from the checkpoint (too large for a ConfigMap).
    volumes = [{"name": "config", "configMap": {"name": object_name(model, "config")}},
               _model_volume(model),
               {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              _model_mount(model),
              {"name": "tmp", "mountPath": "/tmp"}]
    if router.api_keys_secret:
        volumes.append({"name": "api-keys", "secret": {
            "secretName": router.api_keys_secret,
            "items": [{"key": API_KEYS_SECRET_KEY, "path": API_KEYS_SECRET_KEY}]}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    security_args, security_volumes, security_mounts = _security(model, "router")
    volumes += security_volumes
    mounts += security_mounts
    # /ready answers 503 while a role has no ready worker (no traffic then); /health is
    # liveness only.
    ready_probe = {"httpGet": {"path": "/ready", "port": "http"}}
    live_probe = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "router",
        "image": model.spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["baton"],
        "args": ["router", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
                 "--prefill", worker_service_address(model, "prefill"),
                 "--decode", worker_service_address(model, "decode"),
                 "--port", str(ROUTER_PORT), *security_args],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "env": _common_env(model) + [{"name": "BATON_ROLE", "value": "router"}],
        # The limit bounds what request bodies in flight (requestBodyBudgetBytes) and their
        # decoding may take: past it the container restarts instead of starving the node.
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                      "limits": {"memory": router.memory_limit}},
        "volumeMounts": mounts,
        "readinessProbe": {**ready_probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**live_probe, "periodSeconds": 10, "failureThreshold": 6,
                          "timeoutSeconds": 5},
        "securityContext": _container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(model, object_name(model, "router"), labels),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": selector_labels(model, "router")},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "terminationGracePeriodSeconds":
                        router.request_timeout_seconds + DRAIN_MARGIN_SECONDS,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def router_service(model: Model) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(model, object_name(model, "router"),
                              standard_labels(model, "router", "router")),
        "spec": {"type": "ClusterIP", "selector": selector_labels(model, "router"),
                 "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def disruption_budget(model: Model, role: str, pool: str | None) -> dict:
    name = object_name(model, role, pool)
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _metadata(model, name, standard_labels(model, role, role, pool)),
        # One pod of a pool at a time: node drains proceed, capacity never drops by more.
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": selector_labels(model, role, pool)}},
    }


def pod_monitor(model: Model) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": _metadata(model, model.name, standard_labels(model, "monitoring")),
        "spec": {
            "selector": {"matchLabels": {"baton.dev/model": model.name}},
            # Workers serve /metrics on their metrics port, the router on its HTTP port; a pod
            # without the named port is simply not scraped for that endpoint.
            # honorLabels: the processes label their series with namespace/model/role/pool
            # themselves; the scrape target's own `namespace` must not rename them.
            "podMetricsEndpoints": [
                {"port": "metrics", "path": "/metrics", "honorLabels": True},
                {"port": "http", "path": "/metrics", "honorLabels": True}],
        },
    }


def network_policy(model: Model) -> dict:
    same_model = {"podSelector": {"matchLabels": {"baton.dev/model": model.name}}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(model, object_name(model, "workers"),
                              standard_labels(model, "network")),
        "spec": {
            "podSelector": {"matchExpressions": [
                {"key": "baton.dev/model", "operator": "In", "values": [model.name]},
                {"key": "baton.dev/role", "operator": "In", "values": list(ROLES)}]},
            "policyTypes": ["Ingress"],
            "ingress": [
                # gRPC (requests, state transfer, health): the router and peer workers only.
                {"from": [same_model],
                 "ports": [{"protocol": "TCP", "port": GRPC_PORT}]},
                # Metrics stay scrapable by whatever Prometheus the cluster runs.
                {"ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
        },
    }


def desired_objects(model: Model, *, has_monitoring_api: bool,
                    operator_image: str) -> list[dict]:
    """Every object the Model should own, in creation order (config before its readers).

    `operator_image` is the worker image the operator is configured with; spec.image wins.
    Raises SpecError when the spec cannot run in a cluster (a filesystem-path source).
    """
    if not (model.spec.image or operator_image):
        raise SpecError("spec.image", "no worker image: set spec.image or the operator's "
                                      "worker image")
    _model_volume(model)  # a filesystem-path source is refused before anything is built
    config = config_map(model)
    config_hash = stable_hash(config["data"])
    objects = [config]
    for role in ROLES:
        objects.append(worker_service(model, role))
        for pool in model.spec.role(role).pools:
            objects.append(worker_deployment(model, role, pool,
                                             has_monitoring_api=has_monitoring_api,
                                             image=operator_image, config_hash=config_hash))
            objects.append(disruption_budget(model, role, pool.name))
    objects.append(router_deployment(model, has_monitoring_api=has_monitoring_api,
                                     image=operator_image, config_hash=config_hash))
    objects.append(router_service(model))
    objects.append(disruption_budget(model, "router", None))
    if has_monitoring_api:
        objects.append(pod_monitor(model))
    if model.spec.network_policy.enabled:
        objects.append(network_policy(model))
    return objects
