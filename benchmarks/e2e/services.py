"""The processes of one end-to-end benchmark mode, and CUDA MPS around them.

Service starts a command in its own session with its output in a log file, waits for its
HTTP /ready, and stops it (SIGTERM, then SIGKILL after a grace period) so that nothing
outlives the run. PrivateMps runs an MPS control daemon of the run's own, on private pipe
and log directories, for the processes given its environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from baton.workers.local import http_ok

MPS_BINARY = "nvidia-cuda-mps-control"
STOP_GRACE_S = 60.0


def mps_note(smoke: bool) -> str:
    """Whether CUDA MPS is available or running here, in words for the report."""
    if smoke:
        return "not applicable (a CPU run)"
    binary = shutil.which(MPS_BINARY)
    # CUDA's default pipe directory when the variable is unset.
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipe / "control").exists():
        return (f"an MPS control daemon was running (pipe {pipe}): every CUDA process of "
                "this run, both modes included, shared the GPU through it")
    if binary is None:
        return (f"MPS unavailable ({MPS_BINARY} not found): the prefill and decode workers "
                "shared the GPU by time slicing")
    return (f"MPS available ({binary}) but not running: the disagg mode's workers shared "
            "the GPU by time slicing; the disagg-mps mode starts a private daemon")


class PrivateMps:
    """An MPS control daemon of this run's own (private pipe and log directories)."""

    def __init__(self) -> None:
        binary = shutil.which(MPS_BINARY)
        if binary is None:
            raise RuntimeError(f"disagg-mps: {MPS_BINARY} is not on PATH")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="baton-mps-"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log")}

    def __enter__(self) -> dict[str, str]:
        for d in self.env.values():
            Path(d).mkdir(parents=True)
        subprocess.run([self.binary, "-d"], env={**os.environ, **self.env}, check=True,
                       timeout=60)
        return self.env

    def __exit__(self, *exc) -> None:
        subprocess.run([self.binary], input="quit\n", text=True, env={**os.environ, **self.env},
                       timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class Service:
    """One mode's processes: started, waited for, stopped (nothing outlives stop())."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 port: int) -> None:
        self.name, self.log_path, self.port = name, log_path, port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._log = open(log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(text.splitlines(True)[-lines:])

    def wait_ready(self, timeout_s: float) -> float:
        start = time.monotonic()
        while not http_ok(f"http://127.0.0.1:{self.port}/ready"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{self.name} not ready in {timeout_s:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)
        return time.monotonic() - start

    def stop(self) -> None:
        # SIGTERM: baton up stops its workers and router; the aggregated server exits.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                # baton up's children get SIGTERM from the kernel when it dies.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
