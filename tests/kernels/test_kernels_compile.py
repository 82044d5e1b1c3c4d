"""Every kernel variant the runtime launches compiles for Hopper (sm_90) and Blackwell
(sm_100: the GEMMs and the Mamba2 / attention kernels) without spilling registers: Triton
compiles ahead of time with its bundled ptxas, so this runs without a GPU (the interpreter
tests cannot see compiler failures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "compile_check.py"


def test_kernels_compile_for_hopper_and_blackwell():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("sm_90 ") >= 30 and "HGMMA': 4" in run.stdout  # wgmma in use
    hot_path = [line for line in run.stdout.splitlines()
                if line.startswith(("sm_90 mamba", "sm_90 attention"))]
    assert len(hot_path) >= 20
    # The tensor-core products of the scan and of attention do use tensor cores.
    for name in ("mamba chunk scan bf16", "attention prefill bf16"):
        line = next(line for line in hot_path if name in line)
        assert "HGMMA': 0" not in line, line
    run = subprocess.run([sys.executable, str(SCRIPT), "--arch", "100", "--only", "gemm"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("sm_100 ") >= 4
    run = subprocess.run([sys.executable, str(SCRIPT), "--arch", "100", "--only",
                          "mamba,attention"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("sm_100 ") >= 20
