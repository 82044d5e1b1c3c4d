"""ForwardBatch (what the engine hands the model each step), its check on the host, and the
two per-step plans the layers read: BatchPlan (the torch reference path's indices) and
KernelPlan (the kernels' offsets, lengths and slot ids).

Shapes: T tokens of the step over all sequences, S sequences, P pages per sequence.

Everything about a batch is checked here, on the host, from host data, before anything is
launched: a step never reads a device tensor back to validate itself. ForwardBatch's tensors
should therefore be CPU tensors (device tensors are accepted, at the price of a copy back
that waits for the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.kernels import MambaChunks


@dataclass
class ForwardBatch:
    """One engine step: a mix of prompt chunks and decode tokens of several sequences."""

    input_ids: torch.Tensor  # [T] int64, the step's new tokens of all sequences, concatenated
    positions: torch.Tensor  # [T] int64, position of each token within its sequence
    seq_lens: list[int]  # [S] new tokens per sequence this step (sum == T)
    cached_lens: list[int]  # [S] tokens of the sequence already in the cache (0 = fresh state)
    block_tables: torch.Tensor  # [S, max_pages] int32 KV page ids per sequence (-1 padding)
    state_slots: torch.Tensor  # [S] int64 Mamba state slot per sequence
    spec_verify: bool = False  # True: keep Mamba state after each new token (speculative verify)


@dataclass
class CheckedBatch:
    """A ForwardBatch that passed check_batch, as host data."""

    seq_lens: list[int]
    cached_lens: list[int]
    slots: list[int]  # [S] state slot per sequence
    spec_verify: bool
    input_ids: torch.Tensor  # [T] int64, CPU
    positions: torch.Tensor  # [T] int64, CPU (cached_len + 0..seq_len-1 per sequence)
    tables: torch.Tensor  # [S, max_pages] int64, CPU
    pages_needed: list[int]  # [S] pages each sequence's context spans

    @property
    def context_lens(self) -> list[int]:
        return [c + n for c, n in zip(self.cached_lens, self.seq_lens)]

    def kv_rows(self, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page id, offset in the page) [T] of each new token's K/V, CPU int64."""
        num_seqs = len(self.seq_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs),
                                               torch.tensor(self.seq_lens))
        pages = self.tables[seq_of_token, self.positions // page_size]
        return pages, self.positions % page_size


def check_batch(batch: ForwardBatch, *, page_size: int, num_pages: int, num_slots: int,
                max_len: int, spec_tokens: int, vocab_size: int | None = None) -> CheckedBatch:
    """ValueError naming the field for anything the cache or the model cannot take."""
    seq_lens = [int(n) for n in batch.seq_lens]
    cached_lens = [int(n) for n in batch.cached_lens]
    num_seqs = len(seq_lens)
    if not num_seqs:
        raise ValueError("seq_lens: the batch holds no sequence")
    if len(cached_lens) != num_seqs:
        raise ValueError(
            f"cached_lens: {len(cached_lens)} entries for {num_seqs} sequences in seq_lens")
    if any(n < 1 for n in seq_lens):
        raise ValueError(f"seq_lens: every sequence needs >= 1 new token, got {seq_lens}")
    if any(n < 0 for n in cached_lens):
        raise ValueError(f"cached_lens: must be >= 0, got {cached_lens}")
    total = sum(seq_lens)
    if batch.input_ids.dim() != 1 or batch.input_ids.shape[0] != total:
        raise ValueError(
            f"input_ids: expected [{total}] (sum of seq_lens), got "
            f"{tuple(batch.input_ids.shape)}")
    input_ids = batch.input_ids.detach().cpu()
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: must be an integer tensor, got {input_ids.dtype}")
    if vocab_size is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids: token ids must be in [0, {vocab_size}), got {low}..{high}")
    if tuple(batch.positions.shape) != (total,):
        raise ValueError(f"positions: expected [{total}], got {tuple(batch.positions.shape)}")
    ends = [c + n for c, n in zip(cached_lens, seq_lens)]
    for s, end in enumerate(ends):
        if end > max_len:
            raise ValueError(
                f"sequence {s}: {end} tokens exceed the model's context of {max_len} tokens "
                "(max_model_len)")
    lens = torch.tensor(seq_lens)
    # Token i of the packing, the j-th of sequence s, sits at cached_lens[s] + j.
    offsets = torch.tensor(cached_lens) - (lens.cumsum(0) - lens)
    positions = torch.repeat_interleave(offsets, lens) + torch.arange(total)
    if not torch.equal(batch.positions.detach().cpu().long(), positions):
        raise ValueError("positions: must be cached_len + 0..seq_len-1 for each sequence")
    tables = batch.block_tables
    if tables.dim() != 2 or tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables: expected [{num_seqs}, max_pages], got {tuple(tables.shape)}")
    slots = batch.state_slots
    if tuple(slots.shape) != (num_seqs,):
        raise ValueError(f"state_slots: expected [{num_seqs}], got {tuple(slots.shape)}")
    slot_list = [int(s) for s in slots.tolist()]
    if any(not 0 <= s < num_slots for s in slot_list):
        raise ValueError(f"state_slots: {slot_list} has a slot outside [0, {num_slots})")
    if len(set(slot_list)) != len(slot_list):
        raise ValueError(f"state_slots: {slot_list} gives two sequences the same slot")
    pages_needed = [-(-end // page_size) for end in ends]
    tables_cpu = tables.detach().cpu().long()
    need = torch.tensor(pages_needed)
    used = torch.arange(tables_cpu.shape[1])[None, :] < need[:, None]  # [S, max_pages]
    bad = (used & ((tables_cpu < 0) | (tables_cpu >= num_pages))).any(1)
    bad |= need > tables_cpu.shape[1]
    if bool(bad.any()):
        s = int(bad.nonzero()[0])
        raise ValueError(
            f"block_tables: sequence {s} needs {pages_needed[s]} valid page ids (of "
            f"{num_pages}) for {ends[s]} tokens, got {tables_cpu[s].tolist()}")
    if batch.spec_verify:
        if not spec_tokens:
            raise ValueError("spec_verify: the cache was allocated with spec_tokens=0")
        if max(seq_lens, default=0) > spec_tokens + 1:
            raise ValueError(
                f"seq_lens: spec_verify takes at most 1 + spec_tokens = {spec_tokens + 1} "
                f"tokens per sequence, got {max(seq_lens)}")
    return CheckedBatch(seq_lens, cached_lens, slot_list, bool(batch.spec_verify),
                        input_ids.long(), positions, tables_cpu, pages_needed)


class BatchPlan:
    """Per-step indices shared by all layers of the torch reference path: where each token's
    K/V goes, which sequences take the batched single-token path, the causal masks of prompt
    chunks."""

    uses_kernels = False

    def __init__(self, batch: ForwardBatch, *, page_size: int, num_pages: int, num_slots: int,
                 max_len: int, spec_tokens: int, device: torch.device,
                 vocab_size: int | None = None):
        checked = check_batch(batch, page_size=page_size, num_pages=num_pages,
                              num_slots=num_slots, max_len=max_len, spec_tokens=spec_tokens,
                              vocab_size=vocab_size)
        seq_lens, cached_lens, slot_list = checked.seq_lens, checked.cached_lens, checked.slots
        num_seqs, ends = len(seq_lens), checked.context_lens
        tables_cpu = checked.tables
        self.pages_needed = checked.pages_needed
        self.seq_lens, self.cached_lens, self.slots = seq_lens, cached_lens, slot_list
        self.spec_verify = checked.spec_verify
        self.seq_starts = [0] * num_seqs
        for s in range(1, num_seqs):
            self.seq_starts[s] = self.seq_starts[s - 1] + seq_lens[s - 1]
        self.block_tables = batch.block_tables.to(device)
        self.slots_tensor = torch.tensor(slot_list, dtype=torch.long, device=device)
        self.fresh = torch.tensor([c == 0 for c in cached_lens], dtype=torch.bool, device=device)

        pages, offsets = checked.kv_rows(page_size)
        self.kv_page_ids = pages.to(device)
        self.kv_page_offsets = offsets.to(device)

        # Single-token sequences (decode) share one batched path; the rest go chunk by chunk.
        # (Under spec_verify the Mamba layers take their own path; attention does not care.)
        decode = [s for s in range(num_seqs) if seq_lens[s] == 1]
        self.decode_seqs = decode
        self.chunk_seqs = [s for s in range(num_seqs) if seq_lens[s] != 1]
        # Chunks of equal length and equal cached length run as one batch.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for s in self.chunk_seqs:
            by_shape.setdefault((seq_lens[s], cached_lens[s]), []).append(s)
        self.chunk_groups = [
            ChunkGroup(seqs, n, cached, self.seq_starts, slot_list, tables_cpu, page_size, device)
            for (n, cached), seqs in by_shape.items()]
        if decode:
            index = torch.tensor(decode)
            width = max(self.pages_needed[s] for s in decode)
            table = tables_cpu[index, :width].clamp(min=0)  # padding pages are masked out
            keys = torch.arange(width * page_size)
            context = torch.tensor([ends[s] for s in decode])
            self.decode_token_index = torch.tensor(
                [self.seq_starts[s] for s in decode], device=device)
            self.decode_page_table = table.to(device)
            self.decode_key_mask = (keys[None, :] < context[:, None]).to(device)
            self.decode_slots = self.slots_tensor[index.to(device)]
            self.decode_fresh = self.fresh[index.to(device)]
        if self.spec_verify:
            steps = max(seq_lens)
            offsets = torch.arange(steps)
            lens = torch.tensor(seq_lens)
            starts = torch.tensor(self.seq_starts)
            rows = starts[:, None] + torch.minimum(offsets[None, :], lens[:, None] - 1)
            self.verify_token_index = rows.to(device)
            # Per draft position j: the sequences that have a token there and its row (index
            # lists built here, so the layers never sync on a mask).
            valid = offsets[None, :] < lens[:, None]
            self.verify_step_seqs = [valid[:, j].nonzero().flatten().to(device)
                                     for j in range(steps)]
            self.verify_step_rows = [rows[valid[:, j], j].to(device) for j in range(steps)]
        self._device = device


class KernelPlan:
    """The step as the kernels take it (kernels="triton"). A layer reads only these device
    tensors and host ints that depend on the step's shape alone, so a CUDA graph captured
    with a KernelPlan whose tensors are static buffers replays for any batch written into
    them (workers/model/graphs.py). Conventions (baton.kernels.mamba_common): a row whose
    slot id is -1 and whose context length is 0 is inert: it reads and writes no state."""

    uses_kernels = True

    def __init__(self, *, cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                 slot_ids: torch.Tensor, has_initial_state: torch.Tensor,
                 block_tables: torch.Tensor, kv_slots: torch.Tensor, max_tokens: int,
                 spec_tokens: int, spec_verify: bool, split_tokens: int,
                 chunks: MambaChunks | None = None, slots: list[int] | None = None,
                 seq_lens: list[int] | None = None):
        self.cu_seqlens = cu_seqlens  # [S + 1] int32 token offsets of the sequences
        self.context_lens = context_lens  # [S] int32 cached + new tokens (0: inert row)
        self.slot_ids = slot_ids  # [S] int64 Mamba state slot (-1: inert row)
        self.has_initial_state = has_initial_state  # [S] bool, False: start from zeros
        self.block_tables = block_tables  # [S, max_pages] int32 KV page ids
        self.kv_slots = kv_slots  # [T] int64 page * page_size + offset of each token (-1: none)
        self.max_tokens = max_tokens  # most new tokens of a sequence (sizes kernel grids)
        self.spec_verify = spec_verify  # keep per-token Mamba snapshots (verification)
        # Every sequence within 1 + K tokens: attention takes the split-context decode kernel
        # (verification and decode), otherwise the whole batch takes the prefill kernels.
        self.decode = max_tokens <= 1 + spec_tokens
        self.split_tokens = split_tokens  # keys per split of paged_attention (per engine)
        self.chunks = chunks  # the varlen scan's chunk table (steps with longer sequences)
        self.slots = slots or []  # host copies, for the cache's bookkeeping
        self.seq_lens = seq_lens or []
        # Set when the step runs static_step.py's torch ops instead of the kernels (a
        # fixed-shape step on a machine without them): the indices its layers read.
        self.static_rows = None

    @classmethod
    def build(cls, batch: ForwardBatch, *, page_size: int, num_pages: int, num_slots: int,
              max_len: int, spec_tokens: int, chunk_size: int, split_tokens: int,
              device: torch.device, vocab_size: int | None = None) -> KernelPlan:
        checked = check_batch(batch, page_size=page_size, num_pages=num_pages,
                              num_slots=num_slots, max_len=max_len, spec_tokens=spec_tokens,
                              vocab_size=vocab_size)
        pages, offsets = checked.kv_rows(page_size)
        lens = torch.tensor(checked.seq_lens, dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
        longest = max(checked.seq_lens)
        chunks = None
        if longest > 1 and not checked.spec_verify:
            chunks = MambaChunks.build(checked.seq_lens, chunk_size, device)
        return cls(
            cu_seqlens=cu.to(device),
            context_lens=torch.tensor(checked.context_lens, dtype=torch.int32, device=device),
            slot_ids=torch.tensor(checked.slots, dtype=torch.int64, device=device),
            has_initial_state=torch.tensor([c > 0 for c in checked.cached_lens],
                                           dtype=torch.bool, device=device),
            block_tables=checked.tables.to(torch.int32).to(device),
            kv_slots=(pages * page_size + offsets).to(device), max_tokens=longest,
            spec_tokens=spec_tokens, spec_verify=checked.spec_verify,
            split_tokens=split_tokens, chunks=chunks, slots=checked.slots,
            seq_lens=checked.seq_lens)


class ChunkGroup:
    """Prompt chunks of G sequences with the same new length n and cached length."""

    def __init__(self, seqs: list[int], n: int, cached: int, seq_starts: list[int],
                 slots: list[int], tables: torch.Tensor, page_size: int, device: torch.device):
        self.seqs, self.n, self.cached = seqs, n, cached
        self.context = cached + n
        starts = torch.tensor([seq_starts[s] for s in seqs])
        self.rows = (starts[:, None] + torch.arange(n)).to(device)  # [G, n] token rows
        self.slots = torch.tensor([slots[s] for s in seqs], device=device)  # [G]
        pages = -(-self.context // page_size)
        self.page_table = tables[seqs, :pages].to(device)  # [G, pages]
        keys = torch.arange(self.context)
        queries = cached + torch.arange(n)
        # [n, cached + n]: new token i sees keys 0..cached + i.
        self.causal_mask = (keys[None, :] <= queries[:, None]).to(device)
