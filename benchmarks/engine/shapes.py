"""Model shapes the engine and end-to-end benchmarks share (config.json dictionaries).

NANO is a slice of Nemotron 3 Nano 30B-A3B with every one of its per-layer shapes (the
pattern "MEMEM*EM": 4 Mamba2, 3 MoE and 1 attention layer, not the 52 of the release), so a
step touches the bytes of those eight layers exactly as the full model's layers do. SMOKE is
the same architecture at toy widths, for the CPU runs that keep the scripts working.
"""

from __future__ import annotations

NANO = {
    "vocab_size": 131072,
    "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EM",
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "mamba_num_heads": 64,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "max_position_embeddings": 8192,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
}

SMOKE = {
    **NANO,
    "vocab_size": 512,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "ssm_state_size": 16,
    "n_groups": 2,
    "chunk_size": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 48,
    "max_position_embeddings": 1024,
}


def expected_distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens touch under uniformly random top-k routing:
    E * (1 - (1 - k/E)^T) (each expert is missed by one token with probability 1 - k/E)."""
    if not 0 < top_k <= experts:
        raise ValueError(f"top_k: {top_k} must be in 1..experts={experts}")
    if tokens < 0:
        raise ValueError(f"tokens: {tokens} must be >= 0")
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)
