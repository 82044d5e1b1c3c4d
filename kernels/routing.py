"""MoE router top-k (Nemotron-H): sigmoid scores, correction bias, group-limited top-k.

Shapes: `[T, E]`  T tokens, E experts, K top-k, G groups.

The operations and their order are those of transformers' NemotronHTopkRouter, so the chosen
experts and their weights agree bit for bit (ties in top-k resolve the same way).
"""

from __future__ import annotations

import torch


def route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses each token's experts.

    router_logits [T, E] float32; correction_bias [E] or None. Scores are sigmoid(logits);
    the choice is made on scores + correction_bias: experts are split into n_group groups of
    E / n_group, each group scored by the sum of its two best biased scores, the best
    topk_group groups kept, and the top_k experts taken among them. Weights are the unbiased
    scores of the chosen experts, divided by their sum (+1e-20) when norm_topk_prob, times
    routed_scaling_factor.

    Returns (topk_weights [T, K] float32, topk_ids [T, K] int64), ids in no particular order.
    """
    if router_logits.dim() != 2 or router_logits.dtype != torch.float32:
        raise ValueError(
            f"router_logits must be float32 [T, E], got {router_logits.dtype} "
            f"{tuple(router_logits.shape)}"
        )
    num_experts = router_logits.shape[1]
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group={n_group} must be >= 1 and divide the {num_experts} experts")
    per_group = num_experts // n_group
    if per_group < 2:
        raise ValueError(
            f"n_group={n_group} leaves {per_group} expert per group; groups are scored by their "
            "top 2, so each needs at least 2"
        )
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} must be in [1, {topk_group * per_group}] (topk_group * experts per "
            "group)"
        )
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(
            f"correction_bias must have shape ({num_experts},), got {tuple(correction_bias.shape)}"
        )

    scores = router_logits.sigmoid()
    scores_for_choice = scores if correction_bias is None else scores + correction_bias
    group_scores = (
        scores_for_choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    )  # [T, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, num_experts)
    )  # [T, E]
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_ids = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids
