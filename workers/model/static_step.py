"""The fixed-shape step in plain torch: what the decode, MTP-verify and MTP-draft steps of a
batch-size bucket run on a machine without the Triton kernels, written so that torch.compile
(inductor) turns each bucket into one graph (graphs.py compiles it; run eagerly it is the
reference the compiled graph is tested against).

Shapes: S sequences of the bucket, Q tokens per sequence (1 for decode and chained drafts,
1 + K for verification and a draft step's first entries), T = S * Q token rows packed as
KernelPlan packs them (sequence s owns rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1), H query
heads, KV key/value heads, G = H / KV, D head dim, L keys (pages of the step's table width
times the page size), h Mamba heads, p head dim, g groups, n state size, W conv width, k conv
kernel, E experts, I expert width, top-k K_e.

What "fixed shape" asks of the math, and how it is met:
- nothing depends on a tensor's values on the host: no .tolist(), no boolean indexing, no
  loop over the sequences of the batch; loops run over Q (at most 1 + K) and over layers only;
- inert rows (slot -1, context 0, no token: KernelPlan's conventions) compute like real ones
  and write into the cache's scratch row (ModelCache.step_tensors), never into a sequence's
  state; their outputs are never read;
- a sequence's tokens are gathered into a padded [S, Q] view for the per-sequence parts
  (attention, the Mamba recurrence) and scattered back to the packed rows (StepRows);
- attention reads the pages of the step's table, whose width the caller keeps at the pages
  the batch's longest sequence spans (graphs.py passes it as a dynamic dimension), not the
  pages of the longest context the engine allows;
- the routed experts run as dense matmuls over the expert stack with the routing weights as a
  [T, E] mask when every expert is likely hit (T * K_e >= E), else as batched matmuls over
  the chosen experts' gathered weights: a choice made from the bucket's shape only.
"""

from __future__ import annotations

import torch

from baton.kernels.formats import WeightFormat


class StepRows:
    """Per-step indices every layer of a fixed-shape step reads, derived on the device from
    the KernelPlan's buffers (so the step never waits on the host)."""

    def __init__(self, plan, num_rows: int, scratch_slot: int, scratch_kv_row: int):
        cu = plan.cu_seqlens.long()
        num_seqs, q = cu.shape[0] - 1, plan.max_tokens
        starts, lens = cu[:-1], cu[1:] - cu[:-1]  # [S]
        offsets = torch.arange(q, device=cu.device)
        self.max_tokens = q
        # [S, Q] packed row of sequence s's j-th token (clamped for inert positions).
        self.rows = (starts[:, None] + offsets).clamp(max=num_rows - 1)
        # [S, Q] position of that token in its sequence (cached tokens first).
        self.positions = plan.context_lens.long()[:, None] - lens[:, None] + offsets
        rows = torch.arange(num_rows, device=cu.device)
        seq = (rows[:, None] >= cu[None, 1:]).sum(1).clamp(max=num_seqs - 1)  # [T]
        self.seq_of_row = seq
        self.col_of_row = (rows - starts[seq]).clamp(0, q - 1)  # [T]
        slots = plan.slot_ids.long()
        self.slots = torch.where(slots >= 0, slots, scratch_slot)  # [S] scratch for inert
        self.has_state = plan.has_initial_state  # [S] bool: False starts from zeros
        kv = plan.kv_slots.long()
        self.kv_rows = torch.where(kv >= 0, kv, scratch_kv_row)  # [T]

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] packed rows -> [S, Q, ...] per sequence."""
        return packed[self.rows]

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, Q, ...] per sequence -> [T, ...] packed rows."""
        return padded[self.seq_of_row, self.col_of_row]


def store_kv_rows(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                  v_pages: torch.Tensor, kv_rows: torch.Tensor) -> None:
    """k, v [T, KV, D] into rows kv_rows [T] of the pages [N + 1, page, KV, D] (scratch
    included) flattened to token rows."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_pages.view(-1, kv_heads, head_dim).index_copy_(0, kv_rows, k.to(k_pages.dtype))
    v_pages.view(-1, kv_heads, head_dim).index_copy_(0, kv_rows, v.to(v_pages.dtype))


def paged_attention_static(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_tables: torch.Tensor, rows: StepRows,
                           scale: float) -> torch.Tensor:
    """q [T, H, D] packed; the pages [N + 1, page, KV, D]; block_tables [S, width] (-1:
    padding, masked) -> [T, H, D]: each token attends, in fp32, to its sequence's keys at
    positions <= its own."""
    num_seqs, width = block_tables.shape
    page_size, kv_heads, head_dim = k_pages.shape[1:]
    heads, q_len = q.shape[1], rows.max_tokens
    pages = block_tables.clamp(min=0).long()
    keys = k_pages[pages].reshape(num_seqs, width * page_size, kv_heads, head_dim)  # [S, L, KV, D]
    values = v_pages[pages].reshape(num_seqs, width * page_size, kv_heads, head_dim)
    queries = rows.pad(q).reshape(num_seqs, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum("sqkgd,slkd->skqgl", queries.float(), keys.float()) * scale
    key_pos = torch.arange(width * page_size, device=q.device)
    visible = key_pos[None, None, :] <= rows.positions[:, :, None]  # [S, Q, L]
    # A finite fill: an inert row (nothing visible) gets a uniform mix, never NaN.
    scores = scores.masked_fill(~visible[:, None, :, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("skqgl,slkd->sqkgd", probs, values.float())  # [S, Q, KV, G, D]
    return rows.unpad(out.reshape(num_seqs, q_len, heads, head_dim)).to(q.dtype)


def expert_stack(module, prefix: str) -> torch.Tensor:
    """The `prefix` weights of every local expert, [E, N, K] in fp32 (the stored tensor
    itself for unquantized weights; quantized ones are dequantized, once per call)."""
    if module.fmt is WeightFormat.BF16:
        w = getattr(module, f"{prefix}_weight")
        return w if w.dtype == torch.float32 else w.float()
    return torch.stack([module.dequantized_weight(prefix, e)
                        for e in range(module.num_local_experts)])


def experts_static(module, x: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    """QuantExperts' result for x [T, K] routed by topk_ids / topk_weights [T, K_e], in fp32
    with the relu2 activation rounded to x.dtype as the reference does; experts not held
    (expert parallelism) are not supported here."""
    if module.expert_range != (0, module.num_experts):
        raise ValueError("experts_static: the fixed-shape step holds every expert (no expert "
                         f"parallelism), got expert_range={module.expert_range}")
    up, down = expert_stack(module, "up"), expert_stack(module, "down")  # [E, I, K], [E, K, I]
    xf = x.float()
    tokens, top_k = topk_ids.shape
    if tokens * top_k >= module.num_experts:
        # Dense: every expert on every token, the routing weights masking the sum.
        weights = torch.zeros(tokens, module.num_experts, device=x.device,
                              dtype=torch.float32).scatter(1, topk_ids, topk_weights)
        h = torch.matmul(xf, up.transpose(1, 2))  # [E, T, I]
        h = torch.relu(h).square().to(x.dtype).float() * weights.t()[:, :, None]
        return torch.matmul(h, down.transpose(1, 2)).sum(0).to(x.dtype)  # [T, K]
    # Sparse: the chosen experts' weights gathered per (token, slot) pair.
    h = torch.einsum("tk,tjik->tji", xf, up[topk_ids])  # [T, K_e, I]
    h = torch.relu(h).square().to(x.dtype).float()
    y = torch.einsum("tji,tjki->tjk", h, down[topk_ids]) * topk_weights[:, :, None]
    out = y[:, 0]
    for j in range(1, top_k):  # slot order, as the reference adds them
        out = out + y[:, j]
    return out.to(x.dtype)
