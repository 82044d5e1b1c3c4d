"""The operator's pods call the `baton` entry points with flags those entry points accept
(DESIGN.md, Seams: processes and flags), and the ConfigMap is what the workers read."""

from __future__ import annotations

import json

from baton.operator.builders import desired_objects
from baton.operator.spec import Model, WorkerConfig


def objects() -> list[dict]:
    model = Model.from_resource({
        "metadata": {"name": "nano", "namespace": "llm", "uid": "u", "generation": 1},
        "spec": {"source": {"uri": "pvc://store/nano"},
                 "router": {"requestTimeoutSeconds": 300},
                 "prefill": {"pools": [{"name": "blackwell", "gpuProduct": "NVIDIA-B200"}]},
                 "decode": {"pools": [{"name": "hopper", "gpuProduct": "NVIDIA-H100"}]}}})
    return desired_objects(model, has_monitoring_api=False, operator_image="img:1")


def container(name: str) -> dict:
    (dep,) = [o for o in objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_worker_flags_parse_with_the_worker_cli():
    from baton.workers.server.settings import parse_args

    c = container("nano-decode-hopper")
    assert c["command"] == ["baton"] and c["args"][0] == "worker"
    args = parse_args(c["args"][1:])
    assert (args.role, args.pool, args.grpc_port, args.metrics_port) == ("decode", "hopper",
                                                                         50051, 9400)
    assert str(args.config_path) == "/etc/baton/worker-config.json"
    assert args.drain_seconds == 300


def test_router_flags_parse_with_the_router_cli():
    from baton.workers.router.main import parse_args

    c = container("nano-router")
    assert c["command"] == ["baton"] and c["args"][0] == "router"
    args = parse_args(c["args"][1:])
    assert args.prefill == "nano-prefill.llm.svc:50051"
    assert args.decode == "nano-decode.llm.svc:50051"
    assert args.port == 8000


def test_config_map_is_a_worker_config():
    (cm,) = [o for o in objects() if o["kind"] == "ConfigMap"]
    cfg = WorkerConfig.from_dict(json.loads(cm["data"]["worker-config.json"]))
    assert cfg.pool("prefill", "blackwell").fp4_path == "native"
    assert cfg.pool("decode", "hopper").fp4_path == "w4a16"
    assert cfg.router.request_timeout_seconds == 300


def test_operator_process_imports_neither_torch_nor_workers():
    """The operator image has no torch: everything `python -m baton.operator` loads must
    import without it (and without baton.workers / baton.kernels)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import baton.operator.__main__, baton.operator.handlers, baton.operator.reconcile\n"
            "import baton.operator.autoscaler.daemon, baton.operator.crd\n"
            "bad = [m for m in ('torch', 'triton', 'baton.workers', 'baton.kernels')\n"
            "       if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_engine_settings_are_declared_once():
    """The worker configuration file embeds the Model's EngineSpec (and its PrefixCacheSpec):
    one declaration feeds the CRD, the parser of both files and their bounds."""
    import dataclasses

    import pytest

    from baton.operator.fields import openapi_schema
    from baton.operator.spec import EngineSpec, ModelSpec, SpecError, WorkerConfig

    types = {f.name: f.type for f in dataclasses.fields(WorkerConfig)}
    assert types["engine"] in ("EngineSpec", EngineSpec)
    model_engine = openapi_schema(ModelSpec)["properties"]["engine"]
    worker_engine = openapi_schema(WorkerConfig)["properties"]["engine"]
    assert worker_engine["properties"] == model_engine["properties"]
    # The bound the Model always had now holds for the worker file too (it took >= 1 before).
    with pytest.raises(SpecError, match=r"workerConfig.engine.maxModelLen: .*16"):
        WorkerConfig.from_dict({"model": "m", "modelPath": "/m", "engine": {"maxModelLen": 8}})
    with pytest.raises(SpecError, match="multiple of kvPageSize"):
        WorkerConfig.from_dict({"model": "m", "modelPath": "/m",
                                "engine": {"maxModelLen": 100, "kvPageSize": 16}})


def test_routing_names_are_declared_once():
    from baton.operator import spec
    from baton.workers.router import balancer

    assert balancer.ROUTINGS is spec.ROUTINGS
