"""Logits parity with transformers' NemotronHForCausalLM, through a checkpoint it saved."""

from __future__ import annotations

import pytest
import torch

from baton.workers.model import load_model

transformers = pytest.importorskip("transformers")

# Every layer kind, Mamba n_groups > 1, LatentMoE with shared experts, group-limited routing.
HF_CONFIG = dict(
    vocab_size=96, hidden_size=32, hybrid_override_pattern="M*EM-E", num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
    mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
    n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24, moe_latent_size=16, n_group=2, topk_group=2,
    routed_scaling_factor=1.7, norm_topk_prob=True, layer_norm_epsilon=1e-5,
)


# Plain MoE (no latent projection), no group-limited routing, unnormalised weights, conv
# kernel 3, attention first.
HF_CONFIG_PLAIN = dict(
    HF_CONFIG, hybrid_override_pattern="*ME-M", moe_latent_size=None, n_group=1, topk_group=1,
    num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.0, conv_kernel=3,
    chunk_size=4,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter and buffer off its initial value (constant inits hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("A_log"):
                tensor.copy_(torch.log(torch.rand(tensor.shape, generator=gen) * 8 + 0.5))
            elif name.endswith("dt_bias"):
                # softplus(dt + dt_bias) stays far above any time-step clamp.
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 2 - 1)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(noise * 0.2)
            elif tensor.dim() == 1:
                tensor.copy_(1 + 0.2 * noise)
            else:
                tensor.copy_(noise / tensor.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return _save_reference(tmp_path_factory, HF_CONFIG)


def _save_reference(tmp_path_factory, hf_config):
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(**hf_config)
    reference = transformers.NemotronHForCausalLM(config).float().eval()
    perturb_(reference, seed=1)
    path = tmp_path_factory.mktemp("hf_nemotron_h")
    reference.save_pretrained(path)
    return reference, path


@pytest.mark.parametrize("lengths", [(13, 13), (21,), (8,)])
def test_logits_match_transformers(hf_checkpoint, lengths):
    reference, path = hf_checkpoint
    model = load_model(path, dtype=torch.float32, kernels="torch")
    gen = torch.Generator().manual_seed(sum(lengths))
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (len(lengths), lengths[0]), generator=gen)
    with torch.no_grad():
        expected = reference(ids).logits.float()
    got = model(ids)
    assert got.shape == expected.shape == (len(lengths), lengths[0], HF_CONFIG["vocab_size"])
    assert rel_err(got, expected) < 1e-4


def test_parity_catches_a_changed_weight(hf_checkpoint):
    # The comparison above is sensitive: one Mamba parameter changed breaks it.
    reference, path = hf_checkpoint
    model = load_model(path, dtype=torch.float32, kernels="torch")
    with torch.no_grad():
        model.backbone.layers[3].mixer.D.mul_(1.01)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (1, 11), generator=gen)
    with torch.no_grad():
        expected = reference(ids).logits.float()
    assert rel_err(model(ids), expected) > 1e-4


def test_plain_moe_matches_transformers(tmp_path_factory):
    reference, path = _save_reference(tmp_path_factory, HF_CONFIG_PLAIN)
    model = load_model(path, dtype=torch.float32, kernels="torch")
    assert model.backbone.layers[2].mixer.fc1_latent_proj is None
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (2, 15), generator=gen)
    with torch.no_grad():
        expected = reference(ids).logits.float()
    assert rel_err(model(ids), expected) < 1e-4
