"""Real processes for the end-to-end tests: workers, routers, `baton up`; and the reference.

The reference is the single-process engine on the same checkpoint (fp32, greedy), run one
request at a time: what disaggregated serving must reproduce (DESIGN.md, Seams: Tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from baton.workers.local import free_port, grpc_serving, http_ok
from baton.workers.security import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "examples" / "tiny"
MAX_MODEL_LEN = 4096


def worker_config(model_path: Path, speculative_tokens: int = 2, engine: dict | None = None,
                  **router) -> dict:
    return {
        "model": "tiny", "namespace": "e2e", "servedModelName": "tiny",
        "modelPath": str(model_path), "quantization": "auto",
        "engine": {"maxModelLen": MAX_MODEL_LEN, "kvPageSize": 16, "cacheMemoryFraction": "0.5",
                   "dtype": "float32", **(engine or {})},
        "prefill": {"maxBatchTokens": 1024, "expertParallel": 1, "gpusPerReplica": 1},
        "decode": {"maxConcurrency": 8, "speculativeTokens": speculative_tokens,
                   "expertParallel": 1, "gpusPerReplica": 1},
        "router": {"routing": "prefix-aware", "maxQueuedRequests": 64,
                   "requestTimeoutSeconds": 120, "transferTimeoutSeconds": 30,
                   "apiKeysFile": None, **router},
        "pools": {"prefill": [{"name": "local", "fp4Path": "w4a16"}],
                  "decode": [{"name": "local", "fp4Path": "w4a16"}]},
    }


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log_path: Path
    grpc_port: int | None = None
    metrics_port: int | None = None
    http_port: int | None = None
    certs: Path | None = None
    """The CA directory of the cluster's mutual TLS; None: plaintext."""
    started_at: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(text.splitlines(True)[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, argv: list[str], log_dir: Path, env: dict | None = None) -> Process:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "baton.workers.cli", *argv],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                start_new_session=True)
    return Process(name, proc, log_path)


def _security(certs: Path | None) -> list[str]:
    return ["--plaintext"] if certs is None else ["--certs", str(certs)]


def start_worker(role: str, config_path: Path, log_dir: Path, name: str,
                 certs: Path | None = None) -> Process:
    grpc_port, metrics_port = free_port(), free_port()
    p = _spawn(name, ["worker", role, "--config", str(config_path), "--pool", "local",
                      "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                      "--host", "127.0.0.1", "--cache-memory", "64Mi", *_security(certs)],
               log_dir)
    p.grpc_port, p.metrics_port, p.certs = grpc_port, metrics_port, certs
    return p


def start_router(config_path: Path, log_dir: Path, prefill: list[Process],
                 decode: list[Process], certs: Path | None = None) -> Process:
    port = free_port()
    p = _spawn("router", ["router", "--config", str(config_path),
                          "--prefill", ",".join(w.address for w in prefill),
                          "--decode", ",".join(w.address for w in decode),
                          "--host", "127.0.0.1", "--port", str(port),
                          "--discovery-interval", "0.3", *_security(certs)], log_dir)
    p.http_port, p.certs = port, certs
    return p


def wait_ready(processes: list[Process], timeout_s: float = 120.0) -> dict[str, float]:
    """Waits for every worker's SERVING and the routers' /ready; seconds to ready each."""
    deadline = time.monotonic() + timeout_s
    ready: dict[str, float] = {}
    while len(ready) < len(processes):
        for p in processes:
            if p.name in ready:
                continue
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()}")
            ok = (http_ok(f"http://127.0.0.1:{p.http_port}/ready") if p.http_port
                  else grpc_serving(p.grpc_port, p.certs))
            if ok:
                ready[p.name] = time.monotonic() - p.started_at
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in processes)
            raise RuntimeError(f"not ready in {timeout_s} s: {set(ready)} of "
                               f"{[p.name for p in processes]}\n{logs}")
        time.sleep(0.2)  # a bounded poll for the asserted state (all ready)
    return ready


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def running_cluster(run: Path, n_prefill: int = 1, n_decode: int = 2,
                    speculative_tokens: int = 2, engine: dict | None = None,
                    **router) -> Iterator[dict]:
    """Prefill workers, decode workers (MTP speculation with `speculative_tokens` draft
    tokens), a router over them; the prefix cache on, as by default; mutual TLS between them
    as by default (a CA of this run in run/certs). Yields the parts by name: prefill (the
    first), prefills, decodes, workers, router, processes, url, k, certs."""
    config = write_config(run / "config.json", worker_config(
        CHECKPOINT, speculative_tokens=speculative_tokens, engine=engine, **router))
    certs = CertificateAuthority.create().write_dir(run / "certs")
    prefills = [start_worker("prefill", config, run, f"prefill{i}", certs)
                for i in range(n_prefill)]
    decodes = [start_worker("decode", config, run, f"decode{i}", certs)
               for i in range(n_decode)]
    router_process = start_router(config, run, prefills, decodes, certs)
    processes = [*prefills, *decodes, router_process]
    try:
        ready = wait_ready(processes)
        print("time to ready (s):", {k: round(v, 2) for k, v in ready.items()})
        yield {"prefill": prefills[0], "prefills": prefills, "decodes": decodes,
               "workers": [*prefills, *decodes], "router": router_process,
               "processes": processes, "k": speculative_tokens, "certs": certs,
               "url": f"http://127.0.0.1:{router_process.http_port}"}
    finally:
        for p in processes:
            p.stop()


@pytest.fixture(scope="session")
def _shared_cluster(tmp_path_factory) -> Iterator[dict]:
    with running_cluster(tmp_path_factory.mktemp("shared")) as running:
        yield running


@pytest.fixture
def shared_cluster(_shared_cluster) -> Iterator[dict]:
    """One router, one prefill and two decode workers (two draft tokens) for the whole
    session, for the tests that do not kill, stop or drain a worker (those start their own
    with running_cluster). Every process must still run after each test that used it, so a
    test cannot quietly change what the next one sees."""
    yield _shared_cluster
    dead = [p.name for p in _shared_cluster["processes"] if p.proc.poll() is not None]
    assert not dead, f"a test stopped shared processes {dead}: start your own cluster"


class Reference:
    """Greedy fp32 tokens of the single-process engine, with logprobs and top-1/top-2 margins."""

    def __init__(self, model_path: Path) -> None:
        import torch

        from baton.workers.engine import Engine, EngineConfig
        from baton.workers.model import load_model

        model = load_model(model_path, dtype=torch.float32, device="cpu", kernels="torch")
        self.engine = Engine(model, EngineConfig(page_size=16, num_pages=300, max_num_seqs=4,
                                                 max_model_len=MAX_MODEL_LEN))
        self._n = 0
        self._cache: dict[tuple, list[tuple[int, float, float]]] = {}

    def __call__(self, prompt: list[int], n: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[tuple[int, float, float]]:
        """[(token, logprob, margin)] of n tokens after prompt (eos ignored); greedy unless
        a temperature and seed are given."""
        key = (tuple(prompt), n, temperature, seed)
        if key not in self._cache:
            from baton.workers.engine import Request, SamplingParams

            self._n += 1
            rid = f"ref-{self._n}"
            self.engine.add_request(Request(rid, list(prompt), SamplingParams(
                max_tokens=n, temperature=temperature, seed=seed, logprobs=2,
                ignore_eos=True)))
            out = []
            while self.engine.has_work():
                for ev in self.engine.step():
                    if ev.request_id == rid and ev.token_id is not None:
                        (_, lp1), (_, lp2) = ev.top_logprobs[:2]
                        out.append((ev.token_id, ev.logprob, lp1 - lp2))
            self._cache[key] = out
        return self._cache[key]


def start_baton_up(spec: Path, port: int) -> tuple[subprocess.Popen, dict, list[str]]:
    """`baton up spec --port port` in its own session, read until its ready line: (the
    process, the ready summary, the output lines so far). The caller stops it."""
    up = subprocess.Popen(
        [sys.executable, "-m", "baton.workers.cli", "up", str(spec), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    output: list[str] = []
    try:
        for line in up.stdout:
            output.append(line)
            if line.startswith("{") and '"ready"' in line:
                return up, json.loads(line), output
        raise AssertionError("baton up ended before it was ready:\n" + "".join(output))
    except BaseException:
        stop_baton_up(up)
        raise


def stop_baton_up(up: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to its process group if it has not exited within a minute."""
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


@pytest.fixture(scope="session")
def demo_up() -> Iterator[dict]:
    """`baton up examples/demo.yaml` (the shipped demo model, its defaults), once for the
    session: its ready summary. Tests that stop or change it start their own."""
    up, ready, _ = start_baton_up(REPO / "examples" / "demo.yaml", free_port())
    try:
        yield ready
    finally:
        stop_baton_up(up)


@pytest.fixture(scope="session")
def e2e():
    """These helpers (test modules cannot import a conftest under --import-mode=importlib)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference(CHECKPOINT)


def assert_matches_reference(got: list[tuple[int, float]],
                             expected: list[tuple[int, float, float]], what: str) -> int:
    """Equal greedy tokens wherever the reference margin exceeds 1e-3, logprobs within 1e-4.

    After a token that differs at a near-tie the sequences diverge legitimately; the
    comparison ends there. Returns how many tokens were compared.
    """
    assert len(got) == len(expected), f"{what}: {len(got)} tokens, expected {len(expected)}"
    for i, ((tok, lp), (ref_tok, ref_lp, margin)) in enumerate(zip(got, expected)):
        if tok != ref_tok:
            assert margin <= 1e-3, (f"{what}: token {i} is {tok}, reference {ref_tok} "
                                    f"(margin {margin:.2e})")
            return i
        assert abs(lp - ref_lp) <= 1e-4, (f"{what}: token {i} logprob {lp} vs reference "
                                          f"{ref_lp}")
    return len(got)
