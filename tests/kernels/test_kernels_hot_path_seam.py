"""The Mamba2 and attention kernels called as the model will call them (the cache's tensors
as ModelCache lays them out, the step's indices from BatchPlan) give the model's own torch
path's outputs and cache contents: a fresh prefill, a mixed step (a chunk continuing a slot
beside a decode token), a decode step, a speculative verification and its accept()."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import (
    MambaChunks,
    causal_conv1d,
    causal_conv1d_update,
    mamba_chunk_scan,
    paged_attention,
    prefill_attention,
    ssm_state_update,
)
from baton.workers.model.batch import BatchPlan, ForwardBatch
from baton.workers.model.cache import ModelCache
from baton.workers.model.config import NemotronHConfig
from baton.workers.model.layers import Attention, FormatPlan
from baton.workers.model.mamba import Mamba2Mixer

SPEC = 2
PAGE = 4
# (seq_lens, cached_lens, spec_verify) per step, slots [2, 0]
STEPS = [([11, 5], [0, 0], False), ([6, 1], [11, 5], False), ([1, 1], [17, 6], False),
         ([3, 2], [18, 7], True)]


def config():
    return NemotronHConfig(
        vocab_size=64, hidden_size=32, layer_kinds=["mamba", "attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=8, n_groups=2, chunk_size=4, conv_kernel=4, use_conv_bias=True,
        time_step_limit=(0.0, 5.0), num_nextn_predict_layers=0)


def layers(dtype):
    torch.manual_seed(0)
    c = config()
    mamba = Mamba2Mixer(c, "backbone.layers.0.mixer", FormatPlan(), dtype)
    attention = Attention(c, "backbone.layers.1.mixer", FormatPlan(), dtype)
    with torch.no_grad():
        for module in (mamba, attention):
            for p in module.parameters():
                p.copy_(torch.randn_like(p.float()).to(p.dtype) * 0.3)
        mamba.A_log.copy_(torch.rand(4) * 1.5)
    return mamba, attention


def new_cache(mamba, attention, dtype):
    return ModelCache({0: mamba.cache_spec(), 1: attention.cache_spec()}, 2, num_pages=16,
                      page_size=PAGE, num_slots=3, spec_tokens=SPEC, dtype=dtype,
                      ssm_dtype=torch.float32, device="cpu")


def plan_for(seq_lens, cached_lens, spec):
    tables = torch.tensor([[5, 1, 9, 3, 12, 7], [2, 14, 0, 8, -1, -1]], dtype=torch.int32)
    positions = torch.cat([torch.arange(c, c + n) for n, c in zip(seq_lens, cached_lens)])
    batch = ForwardBatch(input_ids=torch.zeros(sum(seq_lens), dtype=torch.long),
                         positions=positions, seq_lens=seq_lens, cached_lens=cached_lens,
                         block_tables=tables, state_slots=torch.tensor([2, 0]),
                         spec_verify=spec)
    return BatchPlan(batch, page_size=PAGE, num_pages=16, num_slots=3, max_len=64,
                     spec_tokens=SPEC, device=torch.device("cpu"))


def step_indices(plan):
    """What the model passes the kernels: int32 offsets and lengths, the slots, their flags."""
    lens = torch.tensor(plan.seq_lens, dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    context = torch.tensor([c + n for c, n in zip(plan.cached_lens, plan.seq_lens)],
                           dtype=torch.int32)
    return cu, context, plan.slots_tensor, ~plan.fresh


def mamba_kernels(mixer, hidden, plan, cache, layer):
    """Mamba2Mixer.forward_cached with the kernels: one path per step kind."""
    z, xbc, dt = mixer._split(mixer.in_proj(hidden))
    conv_states, ssm_states = cache.mamba_state(layer)
    cu, _, slots, has_init = step_indices(plan)
    weight, bias, longest = mixer.conv1d.weight, mixer.conv1d.bias, max(plan.seq_lens)
    args = dict(D=mixer.D, dt_bias=mixer.dt_bias, dt_limit=mixer.time_step_limit,
                has_initial_state=has_init)
    if plan.spec_verify:
        conv_spec, ssm_spec = cache.spec_state(layer)
        xbc = causal_conv1d_update(xbc, conv_states, weight, bias, slots,
                                   has_initial_state=has_init, cu_seqlens=cu,
                                   max_tokens=longest, conv_windows=conv_spec)
        x, b, c = mixer._split_xbc(xbc)
        y = ssm_state_update(ssm_states, x, dt, mixer._a(), b, c, slots, cu_seqlens=cu,
                             max_tokens=longest, snapshots=ssm_spec, **args)
        cache.mark_pending(plan.slots, plan.seq_lens)
    elif longest == 1:
        xbc = causal_conv1d_update(xbc, conv_states, weight, bias, slots,
                                   has_initial_state=has_init)
        x, b, c = mixer._split_xbc(xbc)
        y = ssm_state_update(ssm_states, x, dt, mixer._a(), b, c, slots, **args)
    else:  # prompt chunks, and any decode tokens beside them, through the varlen scan
        chunks = MambaChunks.build(plan.seq_lens, mixer.chunk_size)
        xbc = causal_conv1d(xbc, weight, bias, chunks, conv_states, slots,
                            has_initial_state=has_init)
        x, b, c = mixer._split_xbc(xbc)
        y = mamba_chunk_scan(x, dt, mixer._a(), b, c, chunks, ssm_states, slots, **args)
    # The kernels added the D skip: the gated norm and out_proj remain.
    return mixer.out_proj(mixer.norm(y.flatten(-2), z).to(hidden.dtype))


def attention_kernels(module, x, plan, cache, layer):
    """Attention.forward_cached with the kernels reading the pages in place."""
    t = x.shape[0]
    q = module.q_proj(x).view(t, module.num_heads, module.head_dim)
    k = module.k_proj(x).view(t, module.num_kv_heads, module.head_dim)
    v = module.v_proj(x).view(t, module.num_kv_heads, module.head_dim)
    k_pages, v_pages = cache.kv_pages(layer)
    k_pages[plan.kv_page_ids, plan.kv_page_offsets] = k
    v_pages[plan.kv_page_ids, plan.kv_page_offsets] = v
    cu, context, _, _ = step_indices(plan)
    longest = max(plan.seq_lens)
    if longest <= 1 + SPEC:  # decode and verification: split over the context
        out = paged_attention(q, k_pages, v_pages, plan.block_tables, context, cu_seqlens=cu,
                              max_queries=longest, split_tokens=16)
    else:
        out = prefill_attention(q, k_pages, v_pages, plan.block_tables, context, cu, longest)
    return module.o_proj(out.reshape(t, -1))


def cache_tensors(torch_cache, kernel_cache, plan):
    """(name, torch path's, kernels') per cache tensor. Of the spec buffers only what accept()
    can read: the model also fills the columns past a shorter sequence's tokens (with its
    last token repeated), the kernels leave them."""
    for name in ("_conv", "_ssm", "_k", "_v", "_conv_spec", "_ssm_spec"):
        for layer, tensor in getattr(torch_cache, name).items():
            other = getattr(kernel_cache, name)[layer]
            if name == "_conv_spec":
                for slot, n in zip(plan.slots, plan.seq_lens):
                    yield name, tensor[slot, :, :3 + n], other[slot, :, :3 + n]
            elif name == "_ssm_spec":
                for slot, n in zip(plan.slots, plan.seq_lens):
                    yield name, tensor[slot, :n], other[slot, :n]
            else:
                yield name, tensor, other


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernels_give_the_model_path_outputs_and_cache(dtype, tol):
    mamba, attention = layers(dtype)
    torch_cache, kernel_cache = new_cache(mamba, attention, dtype), new_cache(mamba, attention,
                                                                              dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for seq_lens, cached_lens, spec in STEPS:
            plan = plan_for(seq_lens, cached_lens, spec)
            hidden = torch.randn(sum(seq_lens), 32, generator=gen).to(dtype)
            for layer, (module, fast) in enumerate([(mamba, mamba_kernels),
                                                    (attention, attention_kernels)]):
                want = module.forward_cached(hidden, plan, torch_cache, layer).float()
                got = fast(module, hidden, plan, kernel_cache, layer).float()
                assert float((got - want).abs().max() / want.abs().max()) < tol, (seq_lens,
                                                                                  layer)
            for name, want, got in cache_tensors(torch_cache, kernel_cache, plan):
                err = (got.float() - want.float()).abs().max()
                assert float(err) <= tol * max(1.0, float(want.float().abs().max())), \
                    (seq_lens, name)
        for cache in (torch_cache, kernel_cache):
            cache.accept(torch.tensor([2, 0]), torch.tensor([2, 1]))
        for name in ("_conv", "_ssm"):
            err = (getattr(kernel_cache, name)[0].float() - getattr(torch_cache, name)[0].float())
            assert float(err.abs().max()) <= tol * max(1.0, float(
                getattr(torch_cache, name)[0].float().abs().max()))
