"""`baton up FILE [--host H] [--port P]`: a Model resource as local processes.

Reads the same Model YAML a cluster gets (baton.operator.spec), resolves its checkpoint
(`source.uri` may be a path relative to the YAML file, or file:///path), writes the worker
configuration every process reads, and starts
    prefill workers  (baton worker prefill, gRPC + /metrics on free local ports),
    decode workers   (baton worker decode, likewise),
    the router       (baton router, the OpenAI API on --host:--port),
as many workers per role as its pools' minReplicas add up to (at least one), all in one
process group owned by this command. On a machine with GPUs the workers take the GPUs in turn
(prefill first); workers that share a GPU share its memory, which baton up splits between their
caches. Otherwise everything runs on the CPU, each worker with --cache-memory of cache (KV
pages, state slots and prefix-cache snapshots). It waits until every worker answers
grpc.health.v1 SERVING and the router's /ready is 200, prints each worker's time to ready
(start to first SERVING) and where everything serves, then runs until Ctrl-C / SIGTERM (or a
child exits) and stops every process: SIGTERM to the group (workers drain), SIGKILL to
whatever is left after the grace period. Children also get SIGTERM from the kernel if this
command dies without cleaning up.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from baton.operator.spec import Model, SpecError, WorkerConfig, worker_config

READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
# A CPU worker's cache unless --cache-memory says otherwise: the machine is shared with the
# other workers (a GPU worker sizes its cache from cacheMemoryFraction instead).
CPU_CACHE_BYTES = 256 << 20
_PR_SET_PDEATHSIG = 1


class UpError(RuntimeError):
    """baton up cannot start or keep the deployment running."""


def load_model_spec(path: Path) -> Model:
    try:
        resource = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UpError(f"cannot read Model resource {path}: {exc}") from None
    try:
        return Model.from_resource(resource)
    except SpecError as exc:
        raise UpError(f"{path}: {exc}") from None


def resolve_checkpoint(model: Model, spec_path: Path) -> Path:
    """The local directory of the Model's checkpoint (path or file:// sources)."""
    uri = model.spec.source.uri
    scheme = model.spec.source.scheme
    if scheme == "file":
        local = Path(uri[len("file://"):])
    elif scheme == "path":
        local = Path(uri).expanduser()
        if not local.is_absolute():
            local = spec_path.parent / local
    else:
        raise UpError(f"spec.source.uri: baton up runs checkpoints on this machine (a path, "
                      f"relative to {spec_path.name}, or file:///path); {uri!r} is a "
                      f"{scheme}:// source for a cluster")
    local = local.resolve()
    if not (local / "config.json").is_file():
        raise UpError(f"spec.source.uri: {uri!r} resolves to {local}, which holds no "
                      f"checkpoint (no config.json)")
    return local


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UpError(f"--port {port}: cannot listen on {host}:{port}: {exc.strerror}; "
                          f"pick another with --port") from None


def visible_gpus() -> list[str]:
    """CUDA device ids this command may hand out (honouring CUDA_VISIBLE_DEVICES)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        count = torch.cuda.device_count()  # no CUDA context is created for this
    except ImportError:
        return []
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def gpu_free_memory(device: str) -> int:
    """Free bytes on one GPU, asked from a short-lived process so that this long-lived one
    holds no CUDA context (and its memory) for the whole run."""
    probe = "import torch; print(torch.cuda.mem_get_info(0)[0])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": device}, timeout=120)
    if out.returncode != 0:
        raise UpError(f"cannot read the free memory of GPU {device}: {out.stderr.strip()}")
    return int(out.stdout.strip())


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def gpu_cache_budgets(free_bytes: int, fraction: float, weights_bytes: int,
                      roles: list[str]) -> list[int]:
    """Cache bytes for the workers of `roles` sharing one GPU, in that order.

    Of `fraction` of the free memory, every worker's weights come off first; the rest is
    shared out with a decode worker counting twice (it holds every running sequence) and a
    prefill worker once (only prompts in flight).
    """
    usable = int(free_bytes * fraction) - len(roles) * weights_bytes
    if usable <= 0:
        raise UpError(f"one GPU with {free_bytes} bytes free cannot hold {len(roles)} copies "
                      f"of {weights_bytes} bytes of weights within engine.cacheMemoryFraction="
                      f"{fraction}; use more GPUs, fewer replicas or a smaller model")
    shares = [2 if role == "decode" else 1 for role in roles]
    budgets = [usable * share // sum(shares) for share in shares]
    budgets[-1] += usable - sum(budgets)
    return budgets


def shared_gpu_cache_budgets(free_bytes: int, fraction: float,
                             weights_bytes: int) -> dict[str, int]:
    """Cache bytes for a prefill and a decode worker sharing one GPU (gpu_cache_budgets)."""
    prefill, decode = gpu_cache_budgets(free_bytes, fraction, weights_bytes,
                                        ["prefill", "decode"])
    return {"prefill": prefill, "decode": decode}


def _child_setup(group: list[int]) -> None:
    """Runs in each child before exec: join the deployment's process group, and die with us."""
    os.setpgid(0, group[0] if group else 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the process group still lets us stop every child


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    grpc_port: int | None = None
    metrics_port: int | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None
    _log: object = field(default=None, repr=False)

    def tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


def grpc_serving(port: int, certs: Path | None = None) -> bool:
    """True when the worker on 127.0.0.1:port answers grpc.health.v1 SERVING (over mutual
    TLS with the operator role's certificate when certs, a CA directory, is given)."""
    import grpc

    from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
    from baton.workers import security

    address = f"127.0.0.1:{port}"
    if certs is None:
        channel = grpc.insecure_channel(address)
    else:
        identity = security.Identity.load(certs, "operator")
        channel = grpc.secure_channel(address, identity.channel_credentials(),
                                      options=security.CHANNEL_OPTIONS)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    """True when GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalDeployment:
    """Router + prefill worker + decode worker of one Model as local processes."""

    def __init__(self, spec_path: Path, host: str = "127.0.0.1", port: int = 8000,
                 run_dir: Path | None = None, cache_memory_bytes: int | None = None) -> None:
        self.spec_path = spec_path.resolve()
        self.host = host
        self.port = port
        self.cache_memory_bytes = cache_memory_bytes
        self.model = load_model_spec(self.spec_path)
        self.checkpoint = resolve_checkpoint(self.model, self.spec_path)
        self.config = worker_config(self.model, str(self.checkpoint))
        if self.config.router.api_keys_file is not None:
            # A Secret only exists in a cluster; local mode serves without keys.
            self.config = WorkerConfig.from_dict(
                {**self.config.to_dict(),
                 "router": {**self.config.to_dict()["router"], "apiKeysFile": None}})
        self._own_run_dir = run_dir is None
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        self.certs: Path | None = None
        """The run's throwaway CA directory (spec.security.transport mtls); None: plaintext."""
        self.children: list[Child] = []
        self._group: list[int] = []
        self.started_at = 0.0

    @property
    def base_url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{shown}:{self.port}"

    def replicas(self, role: str) -> int:
        """Worker processes of a role: its pools' minReplicas, at least one."""
        return max(1, sum(p.min_replicas for p in self.model.spec.role(role).pools))

    def _plan(self) -> list[Child]:
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="baton-up-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "worker-config.json"
        config_path.write_text(self.config.to_json())
        if self.model.spec.security.transport == "mtls":
            from baton.workers.security import CertificateAuthority

            # A CA for this run only: its key never leaves the run directory.
            self.certs = CertificateAuthority.create("baton up CA").write_dir(
                self.run_dir / "certs")
            security_args = ["--certs", str(self.certs)]
        else:
            security_args = ["--plaintext"]
        python = [sys.executable, "-m", "baton.workers.cli"]
        roles = [role for role in ("prefill", "decode") for _ in range(self.replicas(role))]
        devices = visible_gpus()
        # Workers take the GPUs in turn; those on one GPU share it (see the module docstring).
        placed = [devices[i % len(devices)] for i in range(len(roles))] if devices else []
        budgets: list[int | None] = [self.cache_memory_bytes] * len(roles)
        if devices and self.cache_memory_bytes is None:
            for device in devices:
                mine = [i for i, d in enumerate(placed) if d == device]
                if len(mine) > 1:
                    shares = gpu_cache_budgets(
                        gpu_free_memory(device), self.config.engine.cache_memory_fraction,
                        checkpoint_bytes(self.checkpoint), [roles[i] for i in mine])
                    for i, budget in zip(mine, shares):
                        budgets[i] = budget
        elif not devices and self.cache_memory_bytes is None:
            budgets = [CPU_CACHE_BYTES] * len(roles)
        children = []
        seen: dict[str, int] = {}
        for i, role in enumerate(roles):
            n = seen[role] = seen.get(role, -1) + 1
            name = role if n == 0 else f"{role}{n}"
            env = dict(os.environ)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = placed[i]
            else:
                # Workers share the cores: without a cap each would start a thread per core
                # and they would slow each other down.
                env.setdefault("OMP_NUM_THREADS",
                               str(max(1, (os.cpu_count() or 2) // len(roles))))
            pool = getattr(self.config.pools, role)[0].name
            grpc_port, metrics_port = free_port(), free_port()
            argv = python + ["worker", role, "--config", str(config_path), "--pool", pool,
                             "--grpc-port", str(grpc_port), "--metrics-port",
                             str(metrics_port), "--host", "127.0.0.1", *security_args]
            if role == "prefill":
                argv += ["--decode-target", "127.0.0.1"]  # the decode workers are local
            if budgets[i] is not None:
                argv += ["--cache-memory", str(budgets[i])]
            children.append(Child(
                name=name, env=env, log_path=self.run_dir / f"{name}.log",
                grpc_port=grpc_port, metrics_port=metrics_port, argv=argv))
        addresses = {role: ",".join(f"127.0.0.1:{c.grpc_port}" for c, r in zip(children, roles)
                                    if r == role) for role in ("prefill", "decode")}
        children.append(Child(
            name="router", env=dict(os.environ), log_path=self.run_dir / "router.log",
            argv=python + ["router", "--config", str(config_path),
                           "--prefill", addresses["prefill"], "--decode", addresses["decode"],
                           "--host", self.host, "--port", str(self.port),
                           "--discovery-interval", "0.5", *security_args]))
        return children

    def start(self) -> None:
        check_port_free(self.host if self.host not in ("", "0.0.0.0") else "0.0.0.0", self.port)
        self.started_at = time.monotonic()
        for child in self._plan():
            child._log = open(child.log_path, "ab")  # closed in stop()
            child.started_at = time.monotonic()
            child.proc = subprocess.Popen(
                child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=child._log,
                stderr=subprocess.STDOUT, preexec_fn=lambda: _child_setup(self._group))
            if not self._group:
                self._group.append(child.proc.pid)
            self.children.append(child)

    def _exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S,
                   stopped: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {c.name for c in self.children}
        while pending:
            dead = self._exited()
            if dead is not None:
                raise UpError(f"the {dead.name} process exited with code {dead.proc.returncode}"
                              f" while starting; its log ({dead.log_path}) ends with:\n"
                              f"{dead.tail()}")
            if stopped():
                raise UpError("stopped while starting")
            if time.monotonic() > deadline:
                raise UpError(f"not ready within {timeout_s:g} s: still waiting for "
                              f"{', '.join(sorted(pending))}")
            for child in self.children:
                if child.name not in pending:
                    continue
                ready = (http_ok(self.base_url + "/ready") if child.name == "router"
                         else grpc_serving(child.grpc_port, self.certs))
                if ready:
                    child.ready_after_s = time.monotonic() - child.started_at
                    pending.discard(child.name)
            time.sleep(0.2)

    def summary(self) -> str:
        by = {c.name: c for c in self.children}
        lines = [
            f"baton up: model {self.config.served_model_name!r} ({self.checkpoint}) serving",
            f"  OpenAI API     {self.base_url}/v1",
            f"  metrics        router {self.base_url}/metrics",
        ]
        workers = [c for c in self.children if c.name != "router"]
        for c in workers:
            lines.append(f"                 {c.name} http://127.0.0.1:{c.metrics_port}/metrics "
                         f"(gRPC 127.0.0.1:{c.grpc_port})")
        lines.append("  time to ready  " + ", ".join(
            f"{c.name} {c.ready_after_s:.1f} s" for c in [*workers, by["router"]])
            + " (process start to first health SERVING)")
        lines.append("  transport      " + (
            f"mutual TLS, calls authorized by certificate role (CA in {self.certs})"
            if self.certs is not None else "plaintext (spec.security.transport)"))
        lines.append(f"  logs           {self.run_dir}")
        lines.append("Ctrl-C stops every process.")
        return "\n".join(lines)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, SIGKILL what is left after grace_s; no process outlives this."""
        if self._group:
            try:
                os.killpg(self._group[0], signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if self._group:
            try:
                os.killpg(self._group[0], signal.SIGKILL)  # stragglers, grandchildren too
            except ProcessLookupError:
                pass
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.wait()
            if child._log is not None:
                child._log.close()

    def cleanup(self) -> None:
        if self._own_run_dir and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="baton up", description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="Model resource YAML (e.g. examples/tiny.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="router address (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="router HTTP port")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where config and logs go (default: a temporary directory, removed "
                        "on a clean stop)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    p.add_argument("--cache-memory", type=_size, default=None,
                   help="cache bytes of every worker (e.g. 1Gi); default: on a CPU "
                        f"{CPU_CACHE_BYTES >> 20}Mi, on GPUs from engine.cacheMemoryFraction")
    return p.parse_args(argv)


def _size(text: str) -> int:
    from baton.workers.server.settings import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or with Ki/Mi/Gi)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    received: list[int] = []

    def on_signal(signum, _frame):
        # Only a list append here: a handler that takes a lock (Event.set) can deadlock
        # against the main thread holding that same lock when the signal lands.
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        deployment = LocalDeployment(args.file, args.host, args.port, args.run_dir,
                                     args.cache_memory)
    except UpError as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        return 2
    code = 0
    try:
        deployment.start()
        deployment.wait_ready(args.ready_timeout, lambda: bool(received))
        print(deployment.summary(), flush=True)
        print(json.dumps({"event": "ready", "url": deployment.base_url + "/v1",
                          "timeToReadySeconds": {c.name: round(c.ready_after_s, 3)
                                                 for c in deployment.children},
                          "workers": {c.name: {"grpc": c.grpc_port, "metrics": c.metrics_port}
                                      for c in deployment.children if c.name != "router"},
                          "certs": (None if deployment.certs is None
                                    else str(deployment.certs))}), flush=True)
        while not received:
            time.sleep(0.2)
            dead = deployment._exited()
            if dead is not None:
                print(f"baton up: the {dead.name} process exited with code "
                      f"{dead.proc.returncode}; stopping everything. Its log ends with:\n"
                      f"{dead.tail()}", file=sys.stderr)
                code = 1
                break
    except UpError as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        code = 1
    finally:
        deployment.stop()
        if code == 0:
            deployment.cleanup()
        else:
            print(f"baton up: logs kept in {deployment.run_dir}", file=sys.stderr)
    if received:
        print(f"baton up: stopped ({signal.Signals(received[0]).name}); every process exited",
              flush=True)
    return code
