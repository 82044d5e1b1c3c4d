"""Builders without a cluster: a Model with two pools per role gives exactly these objects."""

from __future__ import annotations

import json

import pytest

from baton.operator.builders import desired_objects
from baton.operator.fields import SpecError
from baton.operator.spec import Model, WorkerConfig

IMAGE = "registry.example/baton:1.0"
UID = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"


def two_pool_model(**spec_overrides) -> Model:
    spec = {
        "source": {"uri": "pvc://model-store/nemotron/nano-nvfp4"},
        "prefill": {"gpusPerReplica": 2, "expertParallel": 2, "pools": [
            {"name": "blackwell", "gpuProduct": "NVIDIA-B200", "minReplicas": 1,
             "maxReplicas": 4, "relativeSpeed": "2.5",
             "resources": {"cpu": "16", "memory": "128Gi"}},
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 2,
             "maxReplicas": 8, "nodeSelector": {"pool": "spot"},
             "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]},
        ]},
        "decode": {"pools": [
            {"name": "blackwell", "gpuProduct": "NVIDIA-GB200", "minReplicas": 1,
             "maxReplicas": 2},
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 0,
             "maxReplicas": 3, "fp4Path": "w4a16"},
        ]},
        "router": {"replicas": 2},
    }
    spec.update(spec_overrides)
    return Model.from_resource({
        "apiVersion": "baton.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "nano", "namespace": "llm", "uid": UID, "generation": 1},
        "spec": spec})


def by_kind_name(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_exactly_the_expected_objects():
    objects = desired_objects(two_pool_model(), has_monitoring_api=False, operator_image=IMAGE)
    assert sorted(by_kind_name(objects)) == sorted([
        ("ConfigMap", "nano-config"),
        ("Service", "nano-prefill"), ("Service", "nano-decode"), ("Service", "nano-router"),
        ("Deployment", "nano-prefill-blackwell"), ("Deployment", "nano-prefill-hopper"),
        ("Deployment", "nano-decode-blackwell"), ("Deployment", "nano-decode-hopper"),
        ("Deployment", "nano-router"),
        ("PodDisruptionBudget", "nano-prefill-blackwell"),
        ("PodDisruptionBudget", "nano-prefill-hopper"),
        ("PodDisruptionBudget", "nano-decode-blackwell"),
        ("PodDisruptionBudget", "nano-decode-hopper"),
        ("PodDisruptionBudget", "nano-router"),
    ])
    assert len(objects) == 14
    assert objects[0]["kind"] == "ConfigMap"  # created before the pods that mount it
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["ownerReferences"] == [{
            "apiVersion": "baton.dev/v1alpha1", "kind": "Model", "name": "nano", "uid": UID,
            "controller": True, "blockOwnerDeletion": True}]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "baton"
        assert labels["app.kubernetes.io/instance"] == "nano"
        assert labels["app.kubernetes.io/managed-by"] == "baton-operator"
        assert labels["baton.dev/model"] == "nano"
        assert "helm.sh/chart" not in labels
    json.dumps(objects)  # plain JSON, nothing else


@pytest.mark.parametrize("role,pool,replicas,gpus,product,extra_selector", [
    ("prefill", "blackwell", 1, 2, "NVIDIA-B200", {}),
    ("prefill", "hopper", 2, 2, "NVIDIA-H100-80GB-HBM3", {"pool": "spot"}),
    ("decode", "blackwell", 1, 1, "NVIDIA-GB200", {}),
    ("decode", "hopper", 0, 1, "NVIDIA-H100-80GB-HBM3", {}),
])
def test_worker_deployment(role, pool, replicas, gpus, product, extra_selector):
    objects = by_kind_name(desired_objects(two_pool_model(), has_monitoring_api=False,
                                           operator_image=IMAGE))
    dep = objects[("Deployment", f"nano-{role}-{pool}")]
    selector = {"baton.dev/model": "nano", "baton.dev/role": role, "baton.dev/pool": pool}
    assert dep["spec"]["selector"] == {"matchLabels": selector}
    assert dep["spec"]["replicas"] == replicas
    assert dep["metadata"]["labels"]["app.kubernetes.io/component"] == role
    template = dep["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product, **extra_selector}
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["baton"]
    # Prefill sends state only to the Model's decode workers (their Service's name).
    peers = ["--decode-target", "nano-decode.llm.svc"] if role == "prefill" else []
    assert container["args"] == ["worker", role, "--config", "/etc/baton/worker-config.json",
                                 "--pool", pool, "--grpc-port", "50051",
                                 "--metrics-port", "9400", "--drain-seconds", "600", *peers,
                                 "--certs", "/etc/baton-certs", "--health-port", "50052"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    # The gRPC port is mutual TLS: the kubelet probes the plaintext health-only port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50052}
    # Each worker mounts only the CA certificate and its own role's certificate and key.
    certs = next(v for v in pod["volumes"] if v["name"] == "certs")["secret"]
    assert certs["secretName"] == "nano-certs"
    assert [i["key"] for i in certs["items"]] == ["ca.crt", f"{role}.crt", f"{role}.key"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    assert pod["terminationGracePeriodSeconds"] >= 600  # the request deadline, to drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model"] == {"name": "model", "mountPath": "/models/source",
                               "readOnly": True, "subPath": "nemotron/nano-nvfp4"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "model-store",
                                                         "readOnly": True}
    assert volumes["config"]["configMap"]["name"] == "nano-config"
    # /dev/shm for NCCL only where expert parallelism spans GPUs (prefill: EP 2)
    assert ("dshm" in volumes) == (role == "prefill")


def test_pool_resources_and_tolerations():
    objects = by_kind_name(desired_objects(two_pool_model(), has_monitoring_api=False,
                                           operator_image=IMAGE))
    blackwell = objects[("Deployment", "nano-prefill-blackwell")]["spec"]["template"]["spec"]
    requests = blackwell["containers"][0]["resources"]["requests"]
    assert requests == {"nvidia.com/gpu": "2", "cpu": "16", "memory": "128Gi"}
    hopper = objects[("Deployment", "nano-prefill-hopper")]["spec"]["template"]["spec"]
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in hopper["tolerations"]


def test_services_router_and_config():
    model = two_pool_model()
    objects = by_kind_name(desired_objects(model, has_monitoring_api=False,
                                           operator_image=IMAGE))
    for role in ("prefill", "decode"):
        svc = objects[("Service", f"nano-{role}")]["spec"]
        assert svc["clusterIP"] == "None"
        assert svc["selector"] == {"baton.dev/model": "nano", "baton.dev/role": role}
        assert {p["port"] for p in svc["ports"]} == {50051, 9400}
    router = objects[("Deployment", "nano-router")]
    assert router["spec"]["replicas"] == 2
    assert router["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "router", "--config", "/etc/baton/worker-config.json",
        "--prefill", "nano-prefill.llm.svc:50051", "--decode", "nano-decode.llm.svc:50051",
        "--port", "8000", "--certs", "/etc/baton-certs"]
    router_container = router["spec"]["template"]["spec"]["containers"][0]
    assert router_container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert router_container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # A memory limit bounds what request bodies in flight can take (router.memoryLimit).
    assert router_container["resources"]["limits"] == {"memory": "2Gi"}
    assert objects[("Service", "nano-router")]["spec"]["ports"][0]["port"] == 8000
    cfg = WorkerConfig.from_dict(json.loads(
        objects[("ConfigMap", "nano-config")]["data"]["worker-config.json"]))
    assert cfg.model_path == "/models/source" and cfg.namespace == "llm"
    # The router reads the tokenizer and chat template from the checkpoint at modelPath.
    router_mounts = {m["mountPath"]: m for m in router_container["volumeMounts"]}
    assert router_mounts[cfg.model_path]["readOnly"] is True
    router_volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert router_volumes[router_mounts[cfg.model_path]["name"]]["persistentVolumeClaim"][
        "readOnly"] is True
    assert [(p.name, p.fp4_path) for p in cfg.pools.prefill] == [("blackwell", "native"),
                                                                ("hopper", "w4a16")]
    assert [(p.name, p.fp4_path) for p in cfg.pools.decode] == [("blackwell", "native"),
                                                               ("hopper", "w4a16")]
    for pdb in [o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget"]:
        assert pdb["spec"]["maxUnavailable"] == 1


def test_plaintext_is_an_explicit_opt_out():
    objects = by_kind_name(desired_objects(two_pool_model(security={"transport": "plaintext"}),
                                           has_monitoring_api=False, operator_image=IMAGE))
    for (kind, _), obj in objects.items():
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][-1] == "--plaintext" and "--certs" not in container["args"]
        assert "certs" not in {v["name"] for v in pod["volumes"]}
        if "readinessProbe" in container and "grpc" in container["readinessProbe"]:
            assert container["readinessProbe"]["grpc"] == {"port": 50051}
    with pytest.raises(SpecError, match="spec.security.transport"):
        two_pool_model(security={"transport": "tls"})


def test_config_change_rolls_pods():
    a = by_kind_name(desired_objects(two_pool_model(), has_monitoring_api=False,
                                     operator_image=IMAGE))
    b = by_kind_name(desired_objects(two_pool_model(engine={"maxModelLen": 8192}),
                                     has_monitoring_api=False, operator_image=IMAGE))
    key = ("Deployment", "nano-decode-hopper")
    hash_a = a[key]["spec"]["template"]["metadata"]["annotations"]["baton.dev/config-hash"]
    hash_b = b[key]["spec"]["template"]["metadata"]["annotations"]["baton.dev/config-hash"]
    assert hash_a != hash_b


def test_monitoring_api_gives_pod_monitor_instead_of_annotations():
    objects = by_kind_name(desired_objects(two_pool_model(), has_monitoring_api=True,
                                           operator_image=IMAGE))
    monitor = objects[("PodMonitor", "nano")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {"matchLabels": {"baton.dev/model": "nano"}}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "http"}
    for (kind, _), obj in objects.items():
        if kind == "Deployment":
            annotations = obj["spec"]["template"]["metadata"]["annotations"]
            assert "prometheus.io/scrape" not in annotations


def test_replicas_come_from_autoscaler_status():
    model = two_pool_model(autoscaling={"enabled": True, "prometheusUrl": "http://p:9090"})
    obj = {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
           "metadata": {"name": "nano", "namespace": "llm", "uid": UID, "generation": 1},
           "spec": json.loads(json.dumps(_raw_spec(model))),
           "status": {"autoscaler": {"desired": {"prefill": {"blackwell": 3},
                                                 "decode": {"hopper": 2}}}}}
    scaled = by_kind_name(desired_objects(Model.from_resource(obj), has_monitoring_api=False,
                                          operator_image=IMAGE))
    replicas = {name: o["spec"]["replicas"] for (kind, name), o in scaled.items()
                if kind == "Deployment"}
    assert replicas == {"nano-prefill-blackwell": 3, "nano-prefill-hopper": 2,
                        "nano-decode-blackwell": 1, "nano-decode-hopper": 2,
                        "nano-router": 2}


def _raw_spec(model: Model) -> dict:
    from baton.operator.fields import dump

    return dump(model.spec)


def test_network_policy_and_api_keys():
    model = two_pool_model(networkPolicy={"enabled": True},
                           router={"apiKeysSecret": "nano-keys"})
    objects = by_kind_name(desired_objects(model, has_monitoring_api=False,
                                           operator_image=IMAGE))
    policy = objects[("NetworkPolicy", "nano-workers")]["spec"]
    grpc_rule = next(r for r in policy["ingress"] if "from" in r)
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"baton.dev/model": "nano"}}}]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": 50051}]
    router = objects[("Deployment", "nano-router")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in router["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "nano-keys"
    cfg = json.loads(objects[("ConfigMap", "nano-config")]["data"]["worker-config.json"])
    assert cfg["router"]["apiKeysFile"] == "/etc/baton/api-keys/keys"


@pytest.mark.parametrize("uri,volume,sub_path", [
    ("file:///data/models/nano", {"hostPath": {"path": "/data/models/nano",
                                               "type": "Directory"}}, None),
    ("hf://nvidia/nano", {"hostPath": {"path": "/var/lib/baton/hf/nvidia/nano",
                                       "type": "Directory"}}, None),
    ("pvc://store", {"persistentVolumeClaim": {"claimName": "store", "readOnly": True}}, None),
])
def test_source_volumes(uri, volume, sub_path):
    objects = by_kind_name(desired_objects(two_pool_model(source={"uri": uri}),
                                           has_monitoring_api=False, operator_image=IMAGE))
    pod = objects[("Deployment", "nano-decode-hopper")]["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "model")
    assert {k: v for k, v in vol.items() if k != "name"} == volume
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount.get("subPath") == sub_path


def test_hf_cache_claim():
    model = two_pool_model(source={"uri": "hf://nvidia/nano", "cacheClaim": "hf-cache"})
    objects = by_kind_name(desired_objects(model, has_monitoring_api=False,
                                           operator_image=IMAGE))
    pod = objects[("Deployment", "nano-decode-hopper")]["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount["subPath"] == "nvidia/nano"


def test_path_source_and_missing_image_are_refused():
    with pytest.raises(SpecError, match=r"^spec.source.uri: .*only `baton up`"):
        desired_objects(two_pool_model(source={"uri": "./tiny"}), has_monitoring_api=False,
                        operator_image=IMAGE)
    with pytest.raises(SpecError, match=r"^spec.image: "):
        desired_objects(two_pool_model(), has_monitoring_api=False, operator_image="")
    own = desired_objects(two_pool_model(image="mine:2"), has_monitoring_api=False,
                          operator_image="")
    assert {o["spec"]["template"]["spec"]["containers"][0]["image"]
            for o in own if o["kind"] == "Deployment"} == {"mine:2"}


def test_is_subset_ignores_server_fields_but_not_changed_ones():
    from baton.operator.reconcile import is_subset

    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [
        {"name": "worker", "ports": [{"containerPort": 50051}]}]}}}}
    live = {"metadata": {"resourceVersion": "7"}, "status": {"replicas": 2},
            "spec": {"replicas": 2, "progressDeadlineSeconds": 600, "template": {"spec": {
                "containers": [{"name": "worker", "terminationMessagePath": "/dev/x",
                                "ports": [{"containerPort": 50051, "protocol": "TCP"}]}]}}}}
    assert is_subset(desired, live)
    scaled = {**live, "spec": {**live["spec"], "replicas": 5}}
    assert not is_subset(desired, scaled)
    extra_container = {"spec": {**live["spec"], "template": {"spec": {"containers": [
        live["spec"]["template"]["spec"]["containers"][0], {"name": "sidecar"}]}}}}
    assert not is_subset(desired, extra_container)
    assert not is_subset({"a": {"b": 1}}, {"a": None})


def test_every_built_object_is_a_subset_of_itself_after_json():
    """Builders emit plain JSON whose values survive a round trip unchanged (no tuples,
    no ints where the API server returns strings for quantities)."""
    from baton.operator.reconcile import is_subset

    for obj in desired_objects(two_pool_model(), has_monitoring_api=True,
                               operator_image=IMAGE):
        assert is_subset(obj, json.loads(json.dumps(obj)))
