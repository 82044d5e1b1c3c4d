"""The kernels inside the model (DESIGN.md, Seams: Kernels <-> model): a tiny NVFP4
checkpoint's logits through the Triton path (CPU interpreter) equal the torch reference
path's, in fp32 to fp32 rounding and in bf16 within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import QuantExperts, QuantLinear, WeightFormat
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint

CONFIG = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=32, mamba_num_heads=4,
    mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    moe_latent_size=16, num_nextn_predict_layers=0,
)


@pytest.fixture(scope="module")
def nvfp4_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("nvfp4"), CONFIG, seed=5,
                                   quantization="nvfp4", tokenizer=False)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_logits_match_torch_reference(nvfp4_checkpoint, dtype, tol):
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9),
                        generator=torch.Generator().manual_seed(0))
    reference = load_model(nvfp4_checkpoint, dtype=dtype, kernels="torch")
    fast = load_model(nvfp4_checkpoint, dtype=dtype, kernels="triton")
    quantized = [m for m in fast.modules() if isinstance(m, (QuantLinear, QuantExperts))
                 and m.fmt is WeightFormat.NVFP4]
    assert any(isinstance(m, QuantExperts) for m in quantized)
    assert quantized and all(m.backend == "triton" for m in quantized)
    with torch.no_grad():
        expected, got = reference(ids).float(), fast(ids).float()
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max() / expected.abs().max()) < tol
