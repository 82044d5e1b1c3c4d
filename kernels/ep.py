"""Expert parallelism: a layer's experts sharded over a torch.distributed group.

Shapes: `[T, K]`  T tokens, K in_features, k top-k, n ranks, P pairs (token, slot).

Rank r of n holds experts [floor(r*E/n), floor((r+1)*E/n)). Inside a replica all ranks run
the same batch (DESIGN.md, expert parallelism), so one MoE layer goes:

  1. each rank takes its share of the tokens, [floor(r*T/n), floor((r+1)*T/n));
  2. its (token, slot) pairs go to the ranks owning their experts: all_to_all_single of the
     per-rank counts first, then of the token rows, expert ids and routing weights;
  3. every rank runs its local experts on what it received (QuantExperts.expert_outputs:
     weighted fp32 rows, one per pair);
  4. the rows travel back the same way and land in their pairs' original places;
  5. each rank adds its tokens' k slot rows in slot order 0..k-1 (combine_slots), casts
     to x.dtype, and all_gather gives every rank the whole batch.

Every output row is computed on exactly one rank and copied to the others, so all ranks hold
the same bits. An expert sees its tokens in the same order as on a single rank (sources in
rank order hold increasing token ranges), so with the torch backend the result also equals
the single-rank QuantExperts bit for bit; the Triton backend picks tiles by batch size, so
there it agrees within rounding. Tensors travel as bytes (bit for bit on every backend,
gloo included).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from baton.kernels.experts import QuantExperts, combine_slots


class EPGroup:
    """The process group an MoE layer's experts are sharded over (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise ValueError("EPGroup needs torch.distributed initialized (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def expert_range(self, num_experts: int, rank: int | None = None) -> tuple[int, int]:
        """Experts [first, last) held by `rank` (default: this rank)."""
        if num_experts < self.size:
            raise ValueError(
                f"num_experts={num_experts} cannot be sharded over {self.size} ranks "
                "(each needs at least one)"
            )
        r = self.rank if rank is None else rank
        return r * num_experts // self.size, (r + 1) * num_experts // self.size

    def token_range(self, num_tokens: int, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r * num_tokens // self.size, (r + 1) * num_tokens // self.size

    def owners(self, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The rank holding each expert id."""
        firsts = torch.tensor([self.expert_range(num_experts, r)[0] for r in range(self.size)],
                              device=expert_ids.device)
        return torch.searchsorted(firsts, expert_ids, right=True) - 1

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int]) -> torch.Tensor:
        """all_to_all_single along dim 0, bit for bit (rows travel as bytes)."""
        send = _as_bytes(tensor)
        recv = torch.empty((sum(recv_counts), send.shape[1]), dtype=torch.uint8,
                           device=tensor.device)
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group)
        return _from_bytes(recv, tensor)

    def exchange_counts(self, send_counts: torch.Tensor) -> list[int]:
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv.tolist()

    def all_gather_rows(self, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Concatenates every rank's token slice (token_range) of a [num_rows, ...] tensor."""
        spans = [self.token_range(num_rows, r) for r in range(self.size)]
        widest = max(last - first for first, last in spans)
        data = _as_bytes(rows)
        padded = torch.zeros((widest, data.shape[1]), dtype=torch.uint8, device=rows.device)
        padded[:data.shape[0]] = data
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        gathered = torch.cat([part[:last - first] for part, (first, last) in zip(parts, spans)])
        return _from_bytes(gathered, rows)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """[R, ...] -> uint8 [R, bytes per row]: every backend (gloo included) moves bytes."""
    row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
    flat = tensor.contiguous().view(torch.uint8) if tensor.dim() > 1 else (
        tensor.contiguous().reshape(-1, 1).view(torch.uint8))
    return flat.reshape(tensor.shape[0], row_bytes)


def _from_bytes(data: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _as_bytes, for rows shaped like `like`'s."""
    return data.view(like.dtype).reshape(data.shape[0], *like.shape[1:])


class EPQuantExperts(QuantExperts):
    """A QuantExperts holding only this rank's experts, whose forward dispatches tokens to
    the experts' ranks and combines the results (see the module docstring). Its tensors keep
    QuantExperts' names, with [E_local, ...] shapes for experts expert_range."""

    def __init__(self, num_experts: int, in_features: int, intermediate: int, fmt, dtype,
                 ep: EPGroup, device=None, fp8_per_channel: bool = False):
        super().__init__(num_experts, in_features, intermediate, fmt, dtype, device=device,
                         fp8_per_channel=fp8_per_channel, expert_range=ep.expert_range(num_experts))
        self.ep = ep

    @classmethod
    def from_experts(cls, experts: QuantExperts, ep: EPGroup) -> EPQuantExperts:
        """This rank's shard of `experts` (which holds all experts, or exactly this rank's)."""
        device = experts.up_weight.device
        sharded = cls(experts.num_experts, experts.in_features, experts.intermediate,
                      experts.fmt, experts.dtype, ep, device=device,
                      fp8_per_channel=experts.fp8_per_channel)
        first, last = sharded.expert_range
        if experts.expert_range == (0, experts.num_experts):
            take = slice(first, last)
        elif experts.expert_range == (first, last):
            take = slice(None)
        else:
            raise ValueError(
                f"experts hold {experts.expert_range}; rank {ep.rank} of {ep.size} needs "
                f"({first}, {last}) or all {experts.num_experts}"
            )
        source = dict(experts.named_parameters())
        source.update(experts.named_buffers())
        with torch.no_grad():
            for name, tensor in list(sharded.named_parameters()) + list(sharded.named_buffers()):
                tensor.copy_(source[name][take])
        sharded.set_backend(experts.backend)
        return sharded

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """All ranks pass the same x [T, K], topk_ids and topk_weights [T, k]; all get [T, K]."""
        self._check_routing(x, topk_ids, topk_weights)
        ep = self.ep
        t, k = topk_ids.shape
        first, last = ep.token_range(t)
        # This rank's pairs, ordered by destination rank (stable: pair order kept within).
        ids = topk_ids[first:last].reshape(-1)
        weights = topk_weights[first:last].reshape(-1)
        tokens = torch.arange(first, last, device=x.device).repeat_interleave(k)
        dest = ep.owners(ids, self.num_experts)
        order = torch.argsort(dest, stable=True)
        # Counts stay on the tensors' device for the collective (NCCL moves no CPU tensors).
        send_counts = torch.bincount(dest, minlength=ep.size)
        recv_counts = ep.exchange_counts(send_counts)
        send_counts = send_counts.tolist()

        recv_x = ep.all_to_all(x[tokens[order]], send_counts, recv_counts)
        recv_ids = ep.all_to_all(ids[order], send_counts, recv_counts)
        recv_w = ep.all_to_all(weights[order], send_counts, recv_counts)
        rows = self.expert_outputs(recv_x, torch.arange(recv_x.shape[0], device=x.device),
                                   recv_ids, recv_w)
        back = ep.all_to_all(rows, recv_counts, send_counts)

        slots = torch.empty_like(back)
        slots[order] = back
        mine = combine_slots(slots.view(last - first, k, self.in_features)).to(x.dtype)
        return ep.all_gather_rows(mine, t)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep_rank={self.ep.rank}, ep_size={self.ep.size}"


def shard_experts(module: nn.Module, group: EPGroup | dist.ProcessGroup | None = None
                  ) -> nn.Module:
    """Replaces every QuantExperts under `module` by this rank's EPQuantExperts shard.

    Tensor names stay the same (only the expert dimension shrinks to the local experts), so
    a loader can fill each shard with experts expert_range of the checkpoint. A `module`
    that is itself a QuantExperts is returned sharded; otherwise `module` is changed in place
    and returned.
    """
    ep = group if isinstance(group, EPGroup) else EPGroup(group)
    if isinstance(module, QuantExperts) and not isinstance(module, EPQuantExperts):
        return EPQuantExperts.from_experts(module, ep)
    for name, child in list(module.named_children()):
        if isinstance(child, QuantExperts) and not isinstance(child, EPQuantExperts):
            setattr(module, name, EPQuantExperts.from_experts(child, ep))
        else:
            shard_experts(child, ep)
    return module
