"""Token counts for the repetition penalties, one device row per request.

The OpenAI penalties read how often each token occurs in a request's output, the repetition
penalty whether it occurs in the prompt or the output. Recounting that every step costs a pass
over the whole sequence per row, so PenaltyTable keeps the counts on the device instead, one
row per penalized sequence, and adds each step's new tokens to all rows with one scatter:

    output_counts [R, V] int32  occurrences in the output (an earlier attempt's included)
    appeared      [R, V] bool   tokens of the prompt or the output

A row is taken when a sequence first samples and given back when the sequence object goes
away; the table doubles when full. A speculative row (position N + j of a verification)
counts the j drafts before it on top of its sequence's row, without writing them down.
(logit_bias is sparse, a few ids per request: logits.py adds it by index, before this.)

`apply_penalties` is the math, shared by every sampled row (prefill's first token, decode,
drafting, verification); a penalty that is off for every row of the batch costs nothing:

    x = x / r where x > 0 and the token appeared, x * r where x <= 0 and it appeared
    x = x - frequency * count - presence * (count > 0)

Shapes: [n, V]  n rows, V vocabulary; R table rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch


def apply_penalties(
    x: torch.Tensor,
    counts: torch.Tensor,
    appeared: torch.Tensor,
    presence: torch.Tensor | None,
    frequency: torch.Tensor | None,
    repetition: torch.Tensor | None,
) -> torch.Tensor:
    """Penalized fp32 logits [n, V] (x itself is changed): counts [n, V] int, appeared [n, V]
    bool, presence / frequency / repetition [n] or None where every row has it off."""
    if repetition is not None:
        rep = repetition.unsqueeze(1)
        x = torch.where(appeared, torch.where(x > 0, x / rep, x * rep), x)
    if frequency is not None:
        x -= frequency.unsqueeze(1) * counts
    if presence is not None:
        x -= presence.unsqueeze(1) * (counts > 0)
    return x


class PenaltyTable:
    """Per-sequence token counts and bias rows on the device (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device | str, rows: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=self.device)
        self.appeared = torch.zeros(rows, vocab_size, dtype=torch.bool, device=self.device)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def num_rows(self) -> int:
        return self.output_counts.shape[0]

    def _grow(self) -> None:
        old = self.num_rows
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self.appeared = torch.cat([self.appeared, torch.zeros_like(self.appeared)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def add(self, owner: object, prompt: Sequence[int], output: Sequence[int]) -> int:
        """A row for owner (a Sequence), filled from its prompt part and its output so far;
        the row returns to the table when owner is garbage."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.appeared[row].zero_()
        if prompt:
            ids = torch.tensor(list(prompt), dtype=torch.long, device=self.device)
            self.appeared[row, ids] = True
        self.output_counts[row].zero_()
        self.count([row], [output])
        weakref.finalize(owner, self._free.append, row)
        return row

    def count(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """Add tokens[i] to the output of rows[i], all rows in one scatter."""
        index_rows = [r for r, toks in zip(rows, tokens) for _ in toks]
        if not index_rows:
            return
        dev = self.device
        r = torch.tensor(index_rows, dtype=torch.long, device=dev)
        t = torch.tensor([t for toks in tokens for t in toks], dtype=torch.long, device=dev)
        self.output_counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32),
                                      accumulate=True)
        self.appeared[r, t] = True

    def gather(
        self, rows: Sequence[int], extra: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, appeared) [n, V] of rows, with the extra tokens of each row (the drafts
        before a speculative position) counted as output."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        counts = self.output_counts.index_select(0, idx)
        appeared = self.appeared.index_select(0, idx)
        pairs = [(i, t) for i, toks in enumerate(extra) for t in toks]
        if pairs:
            r = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=self.device)
            t = torch.tensor([t for _, t in pairs], dtype=torch.long, device=self.device)
            counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32), accumulate=True)
            appeared[r, t] = True
        return counts, appeared
