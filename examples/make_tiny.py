"""Writes examples/tiny/: a very small random Nemotron-H checkpoint for the demo and the
end-to-end tests (runs on a laptop CPU). Deterministic: running it again gives the same files.

    python examples/make_tiny.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from baton.workers.model.checkpoint import write_random_checkpoint

# Mamba, attention, MoE (LatentMoE with a shared expert), Mamba, MLP, MoE; one MTP depth.
TINY_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "hybrid_override_pattern": "M*EM-E",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "ssm_state_size": 16,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 32,
    "moe_latent_size": 32,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "layer_norm_epsilon": 1e-5,
    "mamba_ssm_cache_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "tiny"
    write_random_checkpoint(out, TINY_CONFIG, seed=0, dtype=torch.bfloat16, tokenizer=True)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv)
