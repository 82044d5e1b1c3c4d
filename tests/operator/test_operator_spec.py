"""The typed Model spec and WorkerConfig: parsing, defaults, errors that name the field path."""

from __future__ import annotations

import copy
import json

import pytest

from baton.operator.fields import SpecError
from baton.operator.spec import (
    Model,
    WorkerConfig,
    default_fp4_path,
    load_model_file,
    worker_config,
)


def resource(**spec_overrides) -> dict:
    spec = {
        "source": {"uri": "pvc://model-store/nemotron-3-nano-nvfp4"},
        "prefill": {"pools": [
            {"name": "blackwell", "gpuProduct": "NVIDIA-B200", "minReplicas": 1,
             "maxReplicas": 4, "relativeSpeed": "2.5", "costPerHour": "10"},
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 0,
             "maxReplicas": 8},
        ]},
        "decode": {"maxConcurrency": 64, "speculativeTokens": 2, "pools": [
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "maxReplicas": 3},
        ]},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": "nano", "namespace": "llm", "uid": "uid-1", "generation": 3},
            "spec": spec}


def test_parses_design_example_with_defaults():
    model = Model.from_resource(resource())
    assert (model.name, model.namespace, model.uid, model.generation) == ("nano", "llm",
                                                                         "uid-1", 3)
    blackwell, hopper = model.spec.prefill.pools
    assert blackwell.relative_speed == 2.5 and blackwell.cost_per_hour == 10.0
    assert hopper.relative_speed == 1.0 and hopper.min_replicas == 0
    assert (blackwell.fp4_path, hopper.fp4_path) == ("native", "w4a16")
    assert model.spec.engine.max_model_len == 4096
    assert model.spec.router.routing == "prefix-aware"
    assert model.spec.router.local_prefill_max_tokens == 512
    prefix = model.spec.engine.prefix_cache
    assert (prefix.enabled, prefix.snapshot_memory_fraction, prefix.snapshot_interval_tokens) == (
        True, 0.25, 1024)
    assert model.spec.autoscaling.enabled is False
    assert model.spec.autoscaling.targets.attainment == 0.95
    assert model.served_model_name == "nano"


@pytest.mark.parametrize("product,path", [
    ("NVIDIA-B200", "native"), ("NVIDIA-GB200", "native"), ("NVIDIA-B300-SXM6-AC", "native"),
    ("NVIDIA-B100", "native"), ("NVIDIA-H100-80GB-HBM3", "w4a16"), ("NVIDIA-H200", "w4a16"),
    ("NVIDIA-A100-SXM4-80GB", "w4a16"), ("", "w4a16"), ("NVIDIA-RTX-B2000X", "w4a16"),
])
def test_fp4_path_from_gpu_product(product, path):
    assert default_fp4_path(product) == path


def test_explicit_fp4_path_wins():
    obj = resource()
    obj["spec"]["decode"]["pools"][0]["fp4Path"] = "native"
    assert Model.from_resource(obj).spec.decode.pools[0].fp4_path == "native"


def set_path(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    keys = path.replace("]", "").replace("[", ".").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    last = keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


DELETE = object()


@pytest.mark.parametrize("path,value,error", [
    ("spec.prefill.pools[1].minReplicas", 9,
     "spec.prefill.pools[1].maxReplicas: must be >= minReplicas (9), got 8"),
    ("spec.prefill.pools[1].relativeSpeed", 2.5,
     'spec.prefill.pools[1].relativeSpeed: must be a decimal string such as "2.5", got 2.5'),
    ("spec.prefill.pools[0].relativeSpeed", "0",
     "spec.prefill.pools[0].relativeSpeed: must be > 0"),
    ("spec.decode.pools[0].name", "Hopper",
     "spec.decode.pools[0].name: must match"),
    ("spec.prefill.pools[1].name", "blackwell",
     "spec.prefill.pools[1].name: must be unique within the role, 'blackwell' repeats"),
    ("spec.decode.pools", [], "spec.decode.pools: must have at least 1 item(s), got 0"),
    ("spec.prefill", DELETE, "spec.prefill: is required"),
    ("spec.quantization", "int4", "spec.quantization: must be one of auto, nvfp4, fp8, bf16"),
    ("spec.router.routing", "random", "spec.router.routing: must be one of"),
    ("spec.decode.speculativeTokens", True, "spec.decode.speculativeTokens: must be an integer"),
    ("spec.decode.speculativeTokens", 99, "spec.decode.speculativeTokens: must be <= 8"),
    ("spec.decode.expertParallel", 3,
     "spec.decode.expertParallel: must divide gpusPerReplica (1), got 3"),
    ("spec.engine.maxModelLen", 4100,
     "spec.engine.maxModelLen: must be a multiple of kvPageSize (16), got 4100"),
    ("spec.engine.cacheMemoryFraction", "1.5",
     "spec.engine.cacheMemoryFraction: must be <= 1"),
    ("spec.engine.prefixCache", {"snapshotMemoryFraction": "0.95"},
     "spec.engine.prefixCache.snapshotMemoryFraction: must be <= 0.9"),
    ("spec.engine.prefixCache", {"snapshotMemoryFraction": "0"},
     "spec.engine.prefixCache.snapshotMemoryFraction: must be > 0"),
    ("spec.engine.prefixCache", {"snapshotIntervalTokens": 1000},
     "spec.engine.prefixCache.snapshotIntervalTokens: must be a multiple of kvPageSize (16)"),
    ("spec.engine.prefixCache", {"enabled": "yes"},
     "spec.engine.prefixCache.enabled: must be true or false"),
    ("spec.router.localPrefillMaxTokens", -1,
     "spec.router.localPrefillMaxTokens: must be >= 0"),
    ("spec.autoscaling", {"enabled": True},
     "spec.autoscaling.prometheusUrl: is required when enabled is true"),
    ("spec.autoscaling.targets", {"attainment": "95%"}, "spec.autoscaling.targets.attainment"),
    ("spec.autoscaling.rampPerMinute", "11", "spec.autoscaling.rampPerMinute: must be <= 10"),
    ("spec.autoscaling", {"enabled": True, "prometheusUrl": "http://prom:9090",
                          "startupSeconds": 600, "rampPerMinute": "0.2"},
     "spec.autoscaling.rampPerMinute: a ramp of 0.2 of the load per minute rises by 2.10x the "
     "load over startupSeconds 600 + intervalSeconds 30, more than the 1x of spare capacity a "
     "fleet may keep: such a ramp cannot be absorbed; lower rampPerMinute to at most 0.0952 "
     "or shorten startupSeconds"),
    ("spec.source.uri", "s3://bucket/model", "spec.source.uri: unknown scheme"),
    ("spec.source.uri", "file://relative", "spec.source.uri: file:// needs an absolute path"),
    ("spec.prefill.pools[0].replicas", 3, "spec.prefill.pools[0].replicas: unknown field"),
    ("spec.prefill.pools[0].tolerations", [{"operator": "Exists", "value": "x"}],
     "spec.prefill.pools[0].tolerations[0].value: must be unset when operator is Exists"),
    ("spec.prefill.pools[0].resources", {"memory": "lots"},
     "spec.prefill.pools[0].resources.memory: must match"),
    ("metadata.name", "9nano", "metadata.name: must be a DNS-1035 label"),
    ("metadata.name", "n" * 50, "metadata.name: 'nnnn"),
])
def test_errors_name_the_field(path, value, error):
    with pytest.raises(SpecError) as info:
        Model.from_resource(set_path(resource(), path, value))
    assert str(info.value).startswith(error), str(info.value)


def test_desired_replicas_from_autoscaler_status_only_when_enabled():
    obj = resource(autoscaling={"enabled": True, "prometheusUrl": "http://prom:9090"})
    obj["status"] = {"autoscaler": {"desired": {"prefill": {"blackwell": 3, "hopper": 99},
                                                "decode": {}}}}
    model = Model.from_resource(obj)
    blackwell, hopper = model.spec.prefill.pools
    assert model.desired_replicas("prefill", blackwell) == 3
    assert model.desired_replicas("prefill", hopper) == 8  # clamped to maxReplicas
    assert model.desired_replicas("decode", model.spec.decode.pools[0]) == 1  # no decision
    obj["spec"]["autoscaling"]["enabled"] = False
    off = Model.from_resource(obj)
    assert off.desired_replicas("prefill", off.spec.prefill.pools[0]) == 1


def test_bad_autoscaler_status_names_the_field():
    obj = resource()
    obj["status"] = {"autoscaler": {"desired": {"prefill": {"blackwell": -1}}}}
    with pytest.raises(SpecError, match=r"^status.autoscaler.desired.prefill.blackwell: "):
        Model.from_resource(obj)


def test_worker_config_shape_and_round_trip(tmp_path):
    obj = resource(router={"apiKeysSecret": "nano-keys", "transferTimeoutSeconds": 10,
                           "maxRequestBodyBytes": 1048576},
                   engine={"maxModelLen": 8192, "cacheMemoryFraction": "0.85"})
    cfg = worker_config(Model.from_resource(obj), "/models/source")
    expected = {
        "model": "nano", "namespace": "llm", "servedModelName": "nano",
        "modelPath": "/models/source", "quantization": "auto",
        "engine": {"maxModelLen": 8192, "kvPageSize": 16, "cacheMemoryFraction": "0.85",
                   "dtype": "auto", "cudaGraphs": True, "compile": False,
                   "prefixCache": {"enabled": True, "snapshotMemoryFraction": "0.25",
                                   "snapshotIntervalTokens": 1024}},
        "prefill": {"maxBatchTokens": 8192, "expertParallel": 1, "gpusPerReplica": 1},
        "decode": {"maxConcurrency": 64, "speculativeTokens": 2, "expertParallel": 1,
                   "gpusPerReplica": 1},
        "router": {"routing": "prefix-aware", "maxQueuedRequests": 256,
                   "localPrefillMaxTokens": 512,
                   "requestTimeoutSeconds": 600, "transferTimeoutSeconds": 10,
                   "apiKeysFile": "/etc/baton/api-keys/keys", "maxRequestBodyBytes": 1048576,
                   "requestBodyBudgetBytes": 128 * 1024**2,
                   "reasoning": {"minimalTokens": 128, "lowTokens": 512, "mediumTokens": 2048,
                                 "highTokens": 8192, "defaultEffort": None}},
        "pools": {"prefill": [{"name": "blackwell", "fp4Path": "native"},
                              {"name": "hopper", "fp4Path": "w4a16"}],
                  "decode": [{"name": "hopper", "fp4Path": "w4a16"}]},
    }
    assert cfg.to_dict() == expected
    path = tmp_path / "worker-config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    loaded = WorkerConfig.load(path)
    assert loaded == cfg
    assert loaded.engine.max_model_len == 8192 and loaded.decode.speculative_tokens == 2
    assert loaded.pool("prefill", "blackwell").fp4_path == "native"
    with pytest.raises(ValueError, match="known: hopper"):
        loaded.pool("decode", "blackwell")


def test_cuda_graphs_default_on_and_reach_the_worker_config():
    assert Model.from_resource(resource()).spec.engine.cuda_graphs is True
    off = Model.from_resource(resource(engine={"cudaGraphs": False}))
    assert off.spec.engine.cuda_graphs is False
    assert worker_config(off, "/m").to_dict()["engine"]["cudaGraphs"] is False
    assert WorkerConfig.from_dict({"model": "tiny", "modelPath": "/m"}).engine.cuda_graphs
    with pytest.raises(SpecError, match=r"^spec.engine.cudaGraphs: must be true or false"):
        Model.from_resource(resource(engine={"cudaGraphs": "no"}))


def test_compile_defaults_off_and_reaches_the_worker_config():
    assert Model.from_resource(resource()).spec.engine.compile is False
    on = Model.from_resource(resource(engine={"compile": True}))
    assert worker_config(on, "/m").to_dict()["engine"]["compile"] is True
    assert not WorkerConfig.from_dict({"model": "tiny", "modelPath": "/m"}).engine.compile
    with pytest.raises(SpecError, match=r"^spec.engine.compile: must be true or false"):
        Model.from_resource(resource(engine={"compile": "yes"}))


def test_worker_config_from_dict_minimal_and_errors():
    cfg = WorkerConfig.from_dict({"model": "tiny", "modelPath": "/m"})
    assert cfg.served_model_name == "tiny" and cfg.router.request_timeout_seconds == 600
    with pytest.raises(SpecError, match=r"^workerConfig.engine.kvPageSize: must be an integer"):
        WorkerConfig.from_dict({"model": "tiny", "modelPath": "/m",
                                "engine": {"kvPageSize": "16"}})
    with pytest.raises(SpecError, match=r"^workerConfig.modelPath: is required"):
        WorkerConfig.from_dict({"model": "tiny"})


def test_load_model_file(tmp_path):
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([{"kind": "Namespace"}, resource()]))
    model, raw = load_model_file(path)
    assert model.name == "nano" and raw["kind"] == "Model"
