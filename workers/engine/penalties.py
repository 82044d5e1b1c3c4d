"""Token counts for the repetition penalties, kept incrementally per request.

The OpenAI penalties read how often each token occurs in a request's output, the repetition
penalty whether it occurs in the prompt or the output; both change only the logits of tokens
that occurred, a few hundred or thousand of a 128k vocabulary. So nothing here passes over
the vocabulary: PenaltyTable keeps, per penalized sequence (a PenaltyRow),

    output_counts [R, V] int32 (device)  occurrences in the output (an earlier attempt's
                                         included), one table row per sequence
    index  {token: position}  (host)     the distinct tokens of prompt and output, in order
    chunks [k_i] int64 (device)          the same tokens, a few tensors appended as they come

Each step's new tokens go into the counts with one scatter for the batch and into the index
by dict lookups; the distinct tokens new this step travel to the device in one copy. The
entries of a batch, (row, token, count) for every token that occurred, are then one
concatenation and one gather of k = sum of the rows' distinct tokens. A speculative row
(position N + j of a verification) counts the j drafts before it on top of its sequence's
entries, without writing them down. A table row is taken when a sequence first samples and
given back when the sequence object goes away; the table doubles when full. (logit_bias is
sparse too: logits.py adds it by index, before this.)

`apply_penalties` is the math, shared by every sampled row (prefill's first token, decode,
drafting, verification), at the k entries; a penalty that is off for every row of the batch
costs nothing:

    x = x / r where x > 0 and the token occurred, x * r where x <= 0 and it occurred
    x = x - frequency * count - presence * (count > 0)

Shapes: [n, V]  n rows, V vocabulary; [k] entries; R table rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch


def apply_penalties(
    x: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    counts: torch.Tensor,
    presence: torch.Tensor | None,
    frequency: torch.Tensor | None,
    repetition: torch.Tensor | None,
) -> torch.Tensor:
    """Penalize x [n, V] fp32 in place at the entries (rows[j], tokens[j]) [k] of the tokens
    that appeared, counts[j] of them in the output; presence / frequency / repetition [n], or
    None where every row has that penalty off. Returns x."""
    v = x[rows, tokens]
    if repetition is not None:
        rep = repetition[rows]
        v = torch.where(v > 0, v / rep, v * rep)
    if frequency is not None:
        v = v - frequency[rows] * counts
    if presence is not None:
        v = v - presence[rows] * (counts > 0)
    x[rows, tokens] = v
    return x


_COMPACT_CHUNKS = 8
"""A row's distinct-token chunks are concatenated into one when there are more than this."""


class PenaltyRow:
    """One sequence's place in the table and its distinct tokens."""

    def __init__(self, row: int, tokens: list[int], chunk: torch.Tensor) -> None:
        self.row = row
        self.index = {t: i for i, t in enumerate(tokens)}
        self.chunks = [chunk] if len(tokens) else []
        self.pending: list[int] = []
        """Distinct tokens in index but not yet in chunks."""

    @property
    def size(self) -> int:
        return len(self.index)


class PenaltyTable:
    """Per-sequence token counts on the device (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device | str, rows: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=self.device)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def num_rows(self) -> int:
        return self.output_counts.shape[0]

    def _grow(self) -> None:
        old = self.num_rows
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def add(self, owner: object, prompt: Sequence[int], output: Sequence[int]) -> PenaltyRow:
        """A row for owner (a Sequence), from its prompt part and its output so far; the table
        row returns when owner is garbage."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.output_counts[row].zero_()
        distinct = list(dict.fromkeys([*prompt, *output]))
        entry = PenaltyRow(row, distinct, torch.tensor(distinct, dtype=torch.long,
                                                      device=self.device))
        self._count([row], [output])
        weakref.finalize(owner, self._free.append, row)
        return entry

    def _count(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        index_rows = [r for r, toks in zip(rows, tokens) for _ in toks]
        if not index_rows:
            return
        dev = self.device
        r = torch.tensor(index_rows, dtype=torch.long, device=dev)
        t = torch.tensor([t for toks in tokens for t in toks], dtype=torch.long, device=dev)
        self.output_counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32),
                                      accumulate=True)

    def count(self, rows: Sequence[PenaltyRow], tokens: Sequence[Sequence[int]]) -> None:
        """Add tokens[i] to the output of rows[i]: one scatter for all rows, and the new
        distinct tokens to the rows' indexes (one host-to-device copy at the next entries)."""
        for entry, toks in zip(rows, tokens):
            for t in toks:
                if t not in entry.index:
                    entry.index[t] = len(entry.index)
                    entry.pending.append(t)
        self._count([e.row for e in rows], tokens)

    def _flush(self, rows: Sequence[PenaltyRow]) -> None:
        waiting = [e for e in dict.fromkeys(rows) if e.pending]
        if not waiting:
            return
        new = torch.tensor([t for e in waiting for t in e.pending], dtype=torch.long,
                           device=self.device)
        at = 0
        for e in waiting:
            e.chunks.append(new[at : at + len(e.pending)])
            at += len(e.pending)
            e.pending = []
            if len(e.chunks) > _COMPACT_CHUNKS:
                e.chunks = [torch.cat(e.chunks)]

    def entries(
        self, rows: Sequence[PenaltyRow], extra: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(i [k], token [k], output count [k]): every token that occurred in rows[i], with
        the extra tokens of each row (the drafts before a speculative position) counted as
        output. A row may repeat (the verification rows of one sequence)."""
        self._flush(rows)
        dev = self.device
        lengths = [e.size for e in rows]
        chunks = [c for e in rows for c in e.chunks]
        tokens = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long, device=dev)
        # output_size: the length is known here, so the device needs no sync to find it.
        i = torch.repeat_interleave(torch.arange(len(rows), device=dev),
                                    torch.tensor(lengths, device=dev), output_size=sum(lengths))
        table_rows = torch.tensor([e.row for e in rows], dtype=torch.long, device=dev)
        counts = self.output_counts[table_rows[i], tokens]
        # Drafts: one more occurrence of a token the row has (at its entry), or a new entry.
        bumps, new_rows, new_tokens = [], [], []
        offset, total = 0, sum(lengths)
        for n, (e, toks) in enumerate(zip(rows, extra)):
            added: dict[int, int] = {}
            for t in toks:
                if t in e.index:
                    bumps.append(offset + e.index[t])
                elif t in added:
                    bumps.append(total + added[t])
                else:
                    added[t] = len(new_tokens)
                    new_rows.append(n)
                    new_tokens.append(t)
            offset += lengths[n]
        if new_tokens:
            i = torch.cat([i, torch.tensor(new_rows, dtype=torch.long, device=dev)])
            tokens = torch.cat([tokens, torch.tensor(new_tokens, dtype=torch.long, device=dev)])
            counts = torch.cat([counts, torch.ones(len(new_tokens), dtype=counts.dtype,
                                                   device=dev)])
        if bumps:
            at = torch.tensor(bumps, dtype=torch.long, device=dev)
            counts = counts.index_put((at,), torch.ones_like(at, dtype=counts.dtype),
                                      accumulate=True)
        return i, tokens, counts
