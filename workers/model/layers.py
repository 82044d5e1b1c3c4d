"""Norms, dense MLP, MoE and grouped-query attention of Nemotron-H.

Shapes: `[B, T, H]`  B sequences, T tokens, H hidden; in the cache-aware path `[T, H]` holds
the tokens of all sequences of a step, concatenated. E experts, K top-k, L latent width,
Q query heads, KV key/value heads, D head dim.

Every projection is a baton.kernels QuantLinear and every expert stack a QuantExperts, so a
checkpoint's quantization is applied by building these modules with its formats; the math
here never branches on it. The router stays an fp32 matmul on a plain weight (the choice of
experts must not depend on the activation dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels import (
    QuantExperts,
    QuantLinear,
    WeightFormat,
    paged_attention,
    prefill_attention,
    route,
    store_kv,
)

from .cache import KVSpec
from .config import NemotronHConfig
from .static_step import experts_static, paged_attention_static, store_kv_rows


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, without a dispatched no-op conversion when it already is (an fp32 model's
    step would otherwise spend an operator call per conversion)."""
    return t if t.dtype == torch.float32 else t.float()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a dispatched no-op conversion when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`, without a dispatched no-op move when it is there already."""
    return t if t.device == device else t.to(device)


class RMSNorm(nn.Module):
    """RMSNorm with the variance and the weight product in fp32."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = as_f32(x)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return as_dtype(as_f32(self.weight) * h, x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated norm: x * silu(gate) in fp32, RMS within each of n_groups groups."""

    def __init__(self, hidden: int, group_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = as_f32(x) * F.silu(as_f32(gate))
        grouped = h.view(*h.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps)
        return as_f32(self.weight) * grouped.view(h.shape)


class FormatPlan:
    """Which WeightFormat each module of the model is built with (from the quant config)."""

    def format_for(self, module_name: str) -> tuple[WeightFormat, bool]:
        """(format, fp8_per_channel) of the module at `module_name` (checkpoint spelling)."""
        return WeightFormat.BF16, False


def quant_linear(in_features: int, out_features: int, name: str, formats: FormatPlan,
                 dtype: torch.dtype, bias: bool = False) -> QuantLinear:
    fmt, per_channel = formats.format_for(name)
    return QuantLinear(in_features, out_features, fmt, dtype, bias=bias,
                       fp8_per_channel=per_channel)


class MLP(nn.Module):
    """down(relu(up(x))^2): the dense '-' layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, name: str, formats: FormatPlan,
                 dtype: torch.dtype, bias: bool):
        super().__init__()
        self.up_proj = quant_linear(hidden, intermediate, f"{name}.up_proj", formats, dtype, bias)
        self.down_proj = quant_linear(intermediate, hidden, f"{name}.down_proj", formats, dtype,
                                      bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())

    def forward_cached(self, x, plan, cache, layer):
        return self.forward(x)


class Router(nn.Module):
    """Router logits in fp32, then the kernels' route() (sigmoid, correction bias, top-k)."""

    def __init__(self, config: NemotronHConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size,
                                               dtype=dtype))
        # Kept in fp32 whatever the model dtype: the bias decides ties between close scores.
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        # fp32 even under autocast (mixed-precision training).
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(as_f32(x), as_f32(self.weight))  # [T, E]
        else:
            logits = F.linear(as_f32(x), as_f32(self.weight))
        return route(logits, as_f32(self.e_score_correction_bias), c.num_experts_per_tok,
                     n_group=c.n_group, topk_group=c.topk_group,
                     norm_topk_prob=c.norm_topk_prob,
                     routed_scaling_factor=float(c.routed_scaling_factor))


class MoE(nn.Module):
    """Routed experts (in the latent width for LatentMoE) plus the shared expert."""

    def __init__(self, config: NemotronHConfig, name: str, formats: FormatPlan,
                 dtype: torch.dtype):
        super().__init__()
        c = config
        self.gate = Router(c, dtype)
        expert_width = c.moe_latent_size or c.hidden_size
        if c.moe_latent_size is not None:
            self.fc1_latent_proj = quant_linear(c.hidden_size, c.moe_latent_size,
                                                f"{name}.fc1_latent_proj", formats, dtype,
                                                c.mlp_bias)
            self.fc2_latent_proj = quant_linear(c.moe_latent_size, c.hidden_size,
                                                f"{name}.fc2_latent_proj", formats, dtype,
                                                c.mlp_bias)
        else:
            self.fc1_latent_proj = None
            self.fc2_latent_proj = None
        fmt, per_channel = formats.format_for(f"{name}.experts")
        self.experts = QuantExperts(c.n_routed_experts, expert_width, c.moe_intermediate_size,
                                    fmt, dtype, fp8_per_channel=per_channel)
        self.shared_experts = (
            MLP(c.hidden_size, c.moe_shared_expert_intermediate_size, f"{name}.shared_experts",
                formats, dtype, c.mlp_bias)
            if c.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        topk_weights, topk_ids = self.gate(flat)  # [T, K]
        routed = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)  # [T, L]
        routed = self.experts(routed, topk_ids, topk_weights)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)  # [T, H]
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.reshape(shape)

    def forward_cached(self, x, plan, cache, layer):
        if getattr(plan, "static_rows", None) is not None:
            return self.forward_static(x)
        return self.forward(x)

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with the routed experts in the fixed-shape form (static_step.py)."""
        topk_weights, topk_ids = self.gate(x)  # [T, K]
        routed = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)  # [T, L]
        routed = experts_static(self.experts, routed, topk_ids, topk_weights)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)  # [T, H]
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed


class Attention(nn.Module):
    """Grouped-query attention without positional encoding (the Mamba layers carry order)."""

    def __init__(self, config: NemotronHConfig, name: str, formats: FormatPlan,
                 dtype: torch.dtype):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scale = c.head_dim ** -0.5
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        bias = c.attention_bias
        self.q_proj = quant_linear(c.hidden_size, q_width, f"{name}.q_proj", formats, dtype, bias)
        self.k_proj = quant_linear(c.hidden_size, kv_width, f"{name}.k_proj", formats, dtype, bias)
        self.v_proj = quant_linear(c.hidden_size, kv_width, f"{name}.v_proj", formats, dtype, bias)
        self.o_proj = quant_linear(q_width, c.hidden_size, f"{name}.o_proj", formats, dtype, bias)
        self.qkv_weight: torch.Tensor | None = None
        """q/k/v's weights as one [Q + 2 KV, H] matrix for the fixed-shape step (fuse_qkv)."""

    def fuse_qkv(self) -> None:
        """Keeps q/k/v's weights as one matrix, so that the fixed-shape step runs one GEMM
        where the eager path runs three: when all three are unquantized and without bias
        (a copy of the layer's q/k/v weights; quantized weights keep three calls)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if all(p.fmt is WeightFormat.BF16 and p.bias is None for p in projs):
            self.qkv_weight = torch.cat([p.weight for p in projs])

    def cache_spec(self) -> KVSpec:
        """What this layer keeps per token in the paged KV cache."""
        return KVSpec(self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """x [T, H]: writes the new tokens' K/V into the layer's pages, attends over each
        sequence's cached + new tokens."""
        if plan.uses_kernels:  # the one place the path is chosen (model.set_kernels)
            if plan.static_rows is not None:
                return self._forward_static(x, plan, cache, layer)
            return self._forward_kernels(x, plan, cache, layer)
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        k_pages, v_pages = cache.kv_pages(layer)  # [num_pages, page_size, KV, D]
        k_pages[plan.kv_page_ids, plan.kv_page_offsets] = as_dtype(k, k_pages.dtype)
        v_pages[plan.kv_page_ids, plan.kv_page_offsets] = as_dtype(v, v_pages.dtype)

        out = torch.empty_like(q)  # [T, Q, D]
        gqa = self.num_heads != self.num_kv_heads
        if plan.decode_seqs:
            # Single-token sequences attend in one padded call.
            keys = k_pages[plan.decode_page_table].flatten(1, 2)  # [S, pages * page_size, KV, D]
            values = v_pages[plan.decode_page_table].flatten(1, 2)
            q_rows = q[plan.decode_token_index].unsqueeze(2)  # [S, Q, 1, D]
            mask = plan.decode_key_mask[:, None, None, :]  # [S, 1, 1, keys]
            attended = F.scaled_dot_product_attention(
                q_rows, as_dtype(keys.transpose(1, 2), q.dtype),
                as_dtype(values.transpose(1, 2), q.dtype), attn_mask=mask, scale=self.scale,
                enable_gqa=gqa)
            out[plan.decode_token_index] = attended.squeeze(2)
        for group in plan.chunk_groups:
            # [G, ctx, KV, D] keys of the group's sequences, new tokens included.
            keys = k_pages[group.page_table].flatten(1, 2)[:, : group.context]
            values = v_pages[group.page_table].flatten(1, 2)[:, : group.context]
            q_rows = q[group.rows].transpose(1, 2)  # [G, Q, n, D]
            # A fresh prompt is plainly causal (lets SDPA take its fused kernels); a chunk
            # after cached tokens needs the offset mask.
            fresh = group.cached == 0
            attended = F.scaled_dot_product_attention(
                q_rows, as_dtype(keys.transpose(1, 2), q.dtype),
                as_dtype(values.transpose(1, 2), q.dtype),
                attn_mask=None if fresh else group.causal_mask, is_causal=fresh,
                scale=self.scale, enable_gqa=gqa)
            out[group.rows] = attended.transpose(1, 2)
        return self.o_proj(out.reshape(t, -1))

    def _forward_static(self, x: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """The fixed-shape step (static_step.py): the KernelPlan's step in plain torch."""
        t = x.shape[0]
        if self.qkv_weight is not None and x.dtype == self.qkv_weight.dtype:
            q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv_weight).split([q_width, kv_width, kv_width], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        k_pages, v_pages = cache.step_tensors(layer)  # [num_pages + 1, page_size, KV, D]
        rows = plan.static_rows
        store_kv_rows(k, v, k_pages, v_pages, rows.kv_rows)
        out = paged_attention_static(q, k_pages, v_pages, plan.block_tables, rows, self.scale)
        return self.o_proj(out.reshape(t, -1))

    def _forward_kernels(self, x: torch.Tensor, plan, cache, layer: int) -> torch.Tensor:
        """The cached step through baton.kernels (a KernelPlan), reading the pages in place:
        decode and verification split over the context, longer sequences take the prefill
        kernel. Inert rows (kv slot -1, context 0) write and read nothing."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        k_pages, v_pages = cache.kv_pages(layer)  # [num_pages, page_size, KV, D]
        store_kv(k, v, k_pages, v_pages, plan.kv_slots)
        if plan.decode:
            out = paged_attention(q, k_pages, v_pages, plan.block_tables, plan.context_lens,
                                  cu_seqlens=plan.cu_seqlens, max_queries=plan.max_tokens,
                                  scale=self.scale, split_tokens=plan.split_tokens)
        else:
            out = prefill_attention(q, k_pages, v_pages, plan.block_tables, plan.context_lens,
                                    plan.cu_seqlens, plan.max_tokens, scale=self.scale)
        return self.o_proj(out.reshape(t, -1))
