"""benchmarks/gpu_session.sh: the GPU session's steps refuse clearly where they cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("args", [(), ("bogus",), ("check", "extra")])
def test_unknown_or_missing_step_prints_usage(args, tmp_path):
    out = run(*args, tmp_path=tmp_path)
    assert out.returncode == 2
    assert ("usage: bash benchmarks/gpu_session.sh "
            "check|hotpath|moe|engine|engine-nvfp4|disagg|transfer|demo-model") in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("step", ["check", "hotpath", "moe", "engine", "engine-nvfp4",
                                  "disagg", "transfer", "demo-model"])
def test_every_step_says_it_needs_a_gpu(step, tmp_path):
    out = run(step, tmp_path=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "no CUDA device visible to torch here" in out.stderr
