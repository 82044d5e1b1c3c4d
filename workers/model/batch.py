"""ForwardBatch (what the engine hands the model each step) and BatchPlan (the indices the
layers need, computed once per step).

Shapes: T tokens of the step over all sequences, S sequences, P pages per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class BatchPlan:
    """Per-step indices shared by all layers: where each token's K/V goes, which sequences
    take the batched single-token path, the causal masks of prompt chunks."""

    def __init__(self, batch: ForwardBatch, *, page_size: int, num_pages: int, num_slots: int,
                 max_len: int, spec_tokens: int, device: torch.device):
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
        if tuple(batch.positions.shape) != (total,):
            raise ValueError(f"positions: expected [{total}], got {tuple(batch.positions.shape)}")
        ends = [c + n for c, n in zip(cached_lens, seq_lens)]
        for s, end in enumerate(ends):
            if end > max_len:
                raise ValueError(
                    f"sequence {s}: {end} tokens exceed the model's context of {max_len} tokens "
                    "(max_model_len)")
        expected_positions = torch.cat(
            [torch.arange(c, e) for c, e in zip(cached_lens, ends)]) if total else torch.empty(0)
        if not torch.equal(batch.positions.detach().cpu().long(), expected_positions.long()):
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
        self.pages_needed = [-(-end // page_size) for end in ends]
        tables_cpu = tables.detach().cpu().long()
        for s, need in enumerate(self.pages_needed):
            row = tables_cpu[s, :need]
            if row.numel() < need or bool((row < 0).any()) or bool((row >= num_pages).any()):
                raise ValueError(
                    f"block_tables: sequence {s} needs {need} valid page ids (of {num_pages}) "
                    f"for {ends[s]} tokens, got {tables_cpu[s].tolist()}")
        if batch.spec_verify:
            if not spec_tokens:
                raise ValueError("spec_verify: the cache was allocated with spec_tokens=0")
            if max(seq_lens, default=0) > spec_tokens + 1:
                raise ValueError(
                    f"seq_lens: spec_verify takes at most 1 + spec_tokens = {spec_tokens + 1} "
                    f"tokens per sequence, got {max(seq_lens)}")

        self.seq_lens, self.cached_lens, self.slots = seq_lens, cached_lens, slot_list
        self.spec_verify = bool(batch.spec_verify)
        self.seq_starts = [0] * num_seqs
        for s in range(1, num_seqs):
            self.seq_starts[s] = self.seq_starts[s - 1] + seq_lens[s - 1]
        self.block_tables = tables.to(device)
        self.slots_tensor = torch.tensor(slot_list, dtype=torch.long, device=device)
        self.fresh = torch.tensor([c == 0 for c in cached_lens], dtype=torch.bool, device=device)

        positions = expected_positions.long()
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(seq_lens))
        pages = tables_cpu[seq_of_token, positions // page_size] if total else positions
        self.kv_page_ids = pages.to(device)
        self.kv_page_offsets = (positions % page_size).to(device)

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
