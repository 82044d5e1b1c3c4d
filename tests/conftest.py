"""Suite-wide test setup.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is decided here, at import
time, and only when no CUDA device exists (DESIGN.md, Seams: Tests).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The repository root must never be on sys.path: its kernels/, operator/, workers/ and proto/
# folders would shadow top-level packages (transformers imports Hugging Face's `kernels`
# whenever that name is importable). `make test` runs the venv's pytest with PYTHONSAFEPATH=1;
# `python -m pytest` from the root prepends it, so it is taken off here, before torch or
# transformers load, and the tests' subprocesses inherit PYTHONSAFEPATH (Python >= 3.11).
# tests/test_packaging.py fails if a shadow is importable anyway.
sys.path[:] = [p for p in sys.path
               if pathlib.Path(p or os.getcwd()).resolve() != REPO]
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def _until(condition, timeout_s: float = 60.0):
    """Polls condition() until it holds; its last value (falsy after timeout_s, which only
    bounds a hang: a loaded machine is slow, never wrong). Use as `assert await until(...)`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # a bounded poll for the asserted state
    return value


@pytest.fixture
def until():
    """_until, for async tests: wait for a state another task or thread brings about."""
    return _until


# Test files (relative to tests/) whose tests start worker, operator, Prometheus or `baton up`
# processes, install a chart, or compile graphs: marked `slow`, so `make test-fast` (pytest -m
# "not slow": the unit tests, for inner loops) leaves them out; `make test` runs everything.
SLOW_PATHS = (
    "e2e/", "benchmarks/", "workers/server/test_server_workers.py",
    "workers/server/test_server_expert_parallel.py", "operator/test_operator_process.py",
    "operator/test_operator_chart.py", "operator/autoscaler/test_autoscaler_integration.py",
    "operator/autoscaler/test_autoscaler_family.py", "test_packaging.py",
    "workers/model/test_model_graphs.py",
)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    tests = pathlib.Path(__file__).resolve().parent
    e2e = set()
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        relative = pathlib.Path(str(item.fspath)).resolve().relative_to(tests).as_posix()
        if relative.startswith(SLOW_PATHS):
            item.add_marker(pytest.mark.slow)
        if relative.startswith("e2e/"):
            e2e.add(item.nodeid)
    # The e2e tests run last (in their own order): their session-scoped deployments
    # (shared_cluster, demo_up) then live only while e2e tests run, not idle beside the rest.
    items.sort(key=lambda item: item.nodeid in e2e)


# One Mamba2, one attention and one MoE layer (LatentMoE, shared expert) and an MTP depth of
# attention + MoE, at the smallest widths the kernels take: the engine's kernel path under
# the interpreter costs seconds per step, so its tests run this.
SMALL_HYBRID = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=32, mamba_num_heads=2,
    mamba_head_dim=8, ssm_state_size=8, n_groups=1, conv_kernel=4, chunk_size=4,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16, moe_latent_size=16, max_position_embeddings=64,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", eos_token_id=2,
)


@pytest.fixture(scope="session")
def small_hybrid_config() -> dict:
    """SMALL_HYBRID, a config.json dictionary for write_random_checkpoint."""
    return dict(SMALL_HYBRID)
