"""`baton up examples/tiny.yaml`: answers within 2 minutes, and SIGTERM stops every process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from baton.workers.local import (
    CPU_CACHE_BYTES,
    LocalDeployment,
    UpError,
    check_port_free,
    free_port,
    gpu_cache_budgets,
    shared_gpu_cache_budgets,
)

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "examples" / "tiny.yaml"

pytestmark = pytest.mark.timeout(240)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_baton_up_serves_tiny_and_sigterm_stops_everything(tmp_path, e2e):
    port = free_port()
    t0 = time.monotonic()
    up, ready, output = e2e.start_baton_up(TINY_YAML, port)
    try:
        client = openai.OpenAI(base_url=ready["url"], api_key="none", max_retries=0)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                        temperature=0)
        elapsed = time.monotonic() - t0
        assert out.usage.completion_tokens >= 1
        assert elapsed < 120, f"first completion after {elapsed:.1f} s"
        summary = "".join(output)
        assert f"http://127.0.0.1:{port}/v1" in summary and "/metrics" in summary
        assert set(ready["timeToReadySeconds"]) == {"prefill", "decode", "router"}
        print(f"baton up: first completion after {elapsed:.1f} s; time to ready "
              f"{ready['timeToReadySeconds']}")

        kids = children_of(up.pid)
        assert len(kids) == 3, kids
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
        output.append(rest)
        assert up.returncode == 0, "".join(output)
        assert "every process exited" in rest
        assert not [k for k in kids if alive(k)]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_up_refuses_what_it_cannot_run(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text(TINY_YAML.read_text().replace("uri: tiny ", "uri: pvc://store/tiny "))
    with pytest.raises(UpError, match="pvc:// source for a cluster"):
        LocalDeployment(spec)
    spec.write_text(TINY_YAML.read_text().replace("uri: tiny ", "uri: missing "))
    with pytest.raises(UpError, match="holds no checkpoint"):
        LocalDeployment(spec)
    spec.write_text("kind: Model\nmetadata: {name: x}\nspec: {source: {uri: 3}}\n")
    with pytest.raises(UpError, match="spec.source"):
        LocalDeployment(spec)
    # A path relative to the YAML file resolves beside it; file:// takes an absolute path.
    (tmp_path / "ckpt").symlink_to(REPO / "examples" / "tiny")
    spec.write_text(TINY_YAML.read_text().replace("uri: tiny ", "uri: ckpt "))
    assert LocalDeployment(spec).checkpoint == (REPO / "examples" / "tiny").resolve()
    spec.write_text(TINY_YAML.read_text().replace(
        "uri: tiny ", f"uri: file://{REPO / 'examples' / 'tiny'} "))
    deployment = LocalDeployment(spec)
    assert deployment.config.model_path == str((REPO / "examples" / "tiny").resolve())
    deployment.cleanup()


def test_port_in_use_is_reported():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UpError, match=f"--port {port}"):
            check_port_free("127.0.0.1", port)


def test_one_gpu_is_split_between_the_workers():
    gib = 1 << 30
    budgets = shared_gpu_cache_budgets(80 * gib, 0.9, 10 * gib)
    assert budgets["prefill"] + budgets["decode"] == int(72 * gib) - 20 * gib
    assert budgets["decode"] > budgets["prefill"] > 0
    with pytest.raises(UpError, match="2 copies"):
        shared_gpu_cache_budgets(16 * gib, 0.9, 8 * gib)
    # Three workers on one GPU: decode workers count twice.
    prefill, d0, d1 = gpu_cache_budgets(80 * gib, 0.9, 10 * gib, ["prefill", "decode", "decode"])
    assert prefill + d0 + d1 == int(72 * gib) - 30 * gib and abs(d0 - 2 * prefill) <= 1


def test_replicas_come_from_min_replicas_and_cpu_workers_get_a_budget(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text(TINY_YAML.read_text().replace("uri: tiny ", f"uri: {REPO}/examples/tiny ")
                    .replace("""  decode:
    maxConcurrency: 16
    speculativeTokens: 1
    pools:
      - name: local
        minReplicas: 1
        maxReplicas: 1""", """  decode:
    maxConcurrency: 16
    speculativeTokens: 1
    pools:
      - name: local
        minReplicas: 2
        maxReplicas: 2"""))
    up = LocalDeployment(spec, run_dir=tmp_path / "run")
    assert (up.replicas("prefill"), up.replicas("decode")) == (1, 2)
    children = up._plan()
    assert [c.name for c in children] == ["prefill", "decode", "decode1", "router"]
    router = children[-1].argv
    decodes = router[router.index("--decode") + 1].split(",")
    assert decodes == [f"127.0.0.1:{c.grpc_port}" for c in children[1:3]]
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not _has_gpu():
        for c in children[:3]:
            assert c.argv[c.argv.index("--cache-memory") + 1] == str(CPU_CACHE_BYTES)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
