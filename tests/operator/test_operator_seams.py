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
