"""The decode-step roofline: the bytes one step must move, and the bandwidth that moves them;
the prefill's flops, and the GEMM rate that bounds them.

Sizes reads the loaded model (every parameter and buffer, the routed expert stacks apart)
and the engine's cache (bytes per Mamba state slot, per KV token); `step_bytes` turns them
into the bytes of one decode step at a batch size (the formula is in bench_engine.py's
docstring). measure_hbm times a large device-to-device copy, measure_gemm_peak a large bf16
matmul; prefill_flops counts a prompt's multiply-adds from the modules.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from shapes import expected_distinct_experts

from baton.kernels import QuantExperts, QuantLinear
from baton.workers.engine import Engine


@dataclass
class Sizes:
    """Bytes of the loaded model and its per-sequence state, read from the modules."""

    dense_bytes: int
    """Every parameter and buffer except the embedding and the routed expert stacks."""
    embedding_row_bytes: int
    expert_bytes: list[tuple[float, int, int]]
    """Per MoE layer: (bytes of one expert, experts E, top-k)."""
    slot_bytes: int
    """Mamba conv + SSM state of one sequence over all layers."""
    kv_token_bytes: float
    """KV of one token over all attention layers."""

    def step_bytes(self, batch: int, context: float) -> float:
        weights = self.dense_bytes + batch * self.embedding_row_bytes
        weights += sum(per * expected_distinct_experts(e, k, batch)
                       for per, e, k in self.expert_bytes)
        state = batch * (2 * self.slot_bytes + (context + 1) * self.kv_token_bytes)
        return weights + state


def model_sizes(model, engine: Engine) -> Sizes:
    config = model.config
    embedding = model.backbone.embeddings.weight
    # A tied lm_head reads the whole matrix every step: then it is all dense bytes.
    tied = model.lm_head.weight is embedding or config.tie_word_embeddings
    experts = []
    skip = set() if tied else {id(embedding)}
    for module in model.modules():
        if isinstance(module, QuantExperts):
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            skip.update(id(t) for t in tensors)
            total = sum(t.numel() * t.element_size() for t in tensors)
            experts.append((total / module.num_experts, module.num_experts,
                            config.num_experts_per_tok))
    dense = sum(t.numel() * t.element_size()
                for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
                if id(t) not in skip)
    cache = engine.cache
    return Sizes(dense_bytes=dense,
                 embedding_row_bytes=0 if tied else embedding.shape[1] * embedding.element_size(),
                 expert_bytes=experts, slot_bytes=cache.bytes_per_slot(),
                 kv_token_bytes=cache.bytes_per_page() / engine.config.page_size)


def measure_hbm(device: torch.device, smoke: bool, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write bytes over time)."""
    elements = (1 << 22) if smoke else (1 << 29)  # bf16: 8 MiB / 1 GiB per buffer
    src = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(reps):
            start_s = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start_s)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def measure_gemm_peak(device: torch.device, smoke: bool, reps: int = 10) -> float:
    """bf16 matmul rate in flop/s: a square n x n x n product (n = 8192; 256 in smoke runs)."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start_s)
    return 2 * n ** 3 / statistics.median(times)


def prefill_flops(model, tokens: int) -> float:
    """2 x the multiply-adds of one prompt of `tokens` tokens through the main model: every
    linear layer (the lm_head for the one row that samples), the routers, each MoE layer's
    top-k experts, and attention's QK and PV over the causal half. The Mamba scan, norms and
    activations are left out (about 1% at Nano shapes)."""
    config = model.config
    flops = 0.0
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        if isinstance(module, QuantLinear):
            rows = 1 if name == "lm_head" else tokens
            flops += 2 * rows * module.in_features * module.out_features
        elif isinstance(module, QuantExperts):
            flops += 2 * 2 * tokens * config.num_experts_per_tok * module.in_features * \
                module.intermediate
    kinds = config.layer_kinds
    flops += kinds.count("moe") * 2 * tokens * config.n_routed_experts * config.hidden_size
    causal_pairs = tokens * (tokens + 1) / 2
    flops += kinds.count("attention") * 2 * 2 * causal_pairs * config.num_attention_heads * \
        config.head_dim
    return flops
