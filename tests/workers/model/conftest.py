"""Tiny random checkpoints shared by the model tests (fp32, every layer kind, MTP)."""

from __future__ import annotations

import pytest
import torch

from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint

TINY = dict(
    vocab_size=300, hidden_size=32, hybrid_override_pattern="M*EM-E*M",
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
    mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4,
    chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, moe_latent_size=16, n_group=2, topk_group=1,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=64,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    return write_random_checkpoint(path, TINY, seed=3, dtype=torch.float32, tokenizer=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32, kernels="torch")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """fp32 logits within `tol` relative error, and equal greedy tokens wherever the
    reference's top-1/top-2 margin exceeds 1e-3 (DESIGN.md, Seams: Tests)."""
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= tol
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.fixture(scope="session")
def logits_close():
    """The comparison of logits across batchings, as a fixture (tests import no helpers)."""
    return assert_logits_match
