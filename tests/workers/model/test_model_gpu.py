"""The model on a CUDA device: the same numbers as on the CPU, the cache-aware path equal to
the full forward, and NVFP4 through the Triton kernels equal to the torch reference."""

from __future__ import annotations

import pytest
import torch

from baton.workers.model import ForwardBatch, load_model
from baton.workers.model.checkpoint import write_random_checkpoint

pytestmark = pytest.mark.gpu

NVFP4_CONFIG = dict(
    vocab_size=512, hidden_size=128, hybrid_override_pattern="M*EM-E", num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, intermediate_size=256, mamba_num_heads=8,
    mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=32, n_routed_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=64, moe_shared_expert_intermediate_size=128,
    moe_latent_size=64,
)


def rel_err(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max())


def test_cuda_matches_cpu_and_cache_matches_full(tiny_checkpoint, tiny_model):
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cuda", kernels="torch")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=gen)
    full = model(ids.cuda())
    assert rel_err(full, tiny_model(ids)) < 1e-4
    cache = model.allocate_cache(num_pages=16, page_size=4, num_slots=2)
    table = torch.tensor([[3, 1, 4, 0, 5, 9, -1], [2, 6, 7, 8, 10, 11, 12]], dtype=torch.int32)
    rows, cached = [], 0
    for n in (9, 7, 1, 1, 5):
        batch = ForwardBatch(
            input_ids=ids[:, cached:cached + n].reshape(-1).cuda(),
            positions=torch.arange(cached, cached + n).repeat(2).cuda(), seq_lens=[n, n],
            cached_lens=[cached, cached], block_tables=table.cuda(),
            state_slots=torch.tensor([1, 0]).cuda())
        rows.append(model.compute_logits(model.forward_batch(batch, cache)).view(2, n, -1))
        cached += n
    assert rel_err(torch.cat(rows, dim=1), full) < 1e-4


def test_nvfp4_triton_path_matches_torch_reference(tmp_path):
    path = write_random_checkpoint(tmp_path, NVFP4_CONFIG, seed=0, quantization="nvfp4",
                                   tokenizer=False)
    ids = torch.randint(0, 512, (4, 37), generator=torch.Generator().manual_seed(1)).cuda()
    reference = load_model(path, dtype=torch.bfloat16, device="cuda", kernels="torch")(ids)
    fast_model = load_model(path, dtype=torch.bfloat16, device="cuda", kernels="auto")
    assert fast_model.backbone.layers[0].mixer.in_proj.backend == "triton"
    assert rel_err(fast_model(ids), reference) < 3e-2
