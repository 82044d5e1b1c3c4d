"""Token counts for the repetition penalties and logit_bias, one device row per request.

The OpenAI penalties read how often each token occurs in a request's output, the repetition
penalty whether it occurs in the prompt or the output. Recounting that every step costs a pass
over the whole sequence per row, so PenaltyTable keeps the counts on the device instead, one
row per penalized sequence, and adds each step's new tokens to all rows with one scatter:

    output_counts [R, V] int32  occurrences in the output (an earlier attempt's included)
    prompt_seen   [R, V] bool   tokens of the prompt before the output
    bias          [R, V] fp32   the request's logit_bias, dense

A row is taken when a sequence first samples and given back when the sequence object goes
away; the table doubles when full. A speculative row (position N + j of a verification)
counts the j drafts before it on top of its sequence's row, without writing them down.

`apply_penalties` is the math, shared by every sampled row (prefill's first token, decode,
drafting, verification):

    x = logits + bias
    x = x / r where x > 0 and the token occurred (prompt or output), x * r where x <= 0
    x = x - frequency * count - presence * (count > 0)

Shapes: [n, V]  n rows, V vocabulary; R table rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor,
    bias: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalized fp32 logits [n, V]; counts [n, V] int, prompt_seen [n, V] bool, bias [n, V],
    presence / frequency / repetition [n]."""
    x = logits.float() + bias
    occurred = counts > 0
    rep = repetition.unsqueeze(1)
    x = torch.where(occurred | prompt_seen, torch.where(x > 0, x / rep, x * rep), x)
    return x - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * occurred


class PenaltyTable:
    """Per-sequence token counts and bias rows on the device (see the module docstring)."""

    def __init__(self, vocab_size: int, device: torch.device | str, rows: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=self.device)
        self.bias = torch.zeros(rows, vocab_size, dtype=torch.float32, device=self.device)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def num_rows(self) -> int:
        return self.output_counts.shape[0]

    def _grow(self) -> None:
        old = self.num_rows
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros_like(self.prompt_seen)])
        self.bias = torch.cat([self.bias, torch.zeros_like(self.bias)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def add(
        self,
        owner: object,
        prompt: Sequence[int],
        output: Sequence[int],
        logit_bias: dict[int, float],
    ) -> int:
        """A row for owner (a Sequence), filled from its prompt part, its output so far and its
        bias; the row returns to the table when owner is garbage."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        dev = self.device
        self.prompt_seen[row].zero_()
        if prompt:
            self.prompt_seen[row, torch.tensor(list(prompt), dtype=torch.long, device=dev)] = True
        self.output_counts[row].zero_()
        self.count([row], [output])
        self.bias[row].zero_()
        if logit_bias:
            ids = torch.tensor(list(logit_bias), dtype=torch.long, device=dev)
            vals = torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=dev)
            self.bias[row, ids] = vals
        weakref.finalize(owner, self._free.append, row)
        return row

    def count(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """Add tokens[i] to the output counts of rows[i], all rows in one scatter."""
        index_rows = [r for r, toks in zip(rows, tokens) for _ in toks]
        if not index_rows:
            return
        dev = self.device
        r = torch.tensor(index_rows, dtype=torch.long, device=dev)
        t = torch.tensor([t for toks in tokens for t in toks], dtype=torch.long, device=dev)
        self.output_counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32),
                                      accumulate=True)

    def gather(
        self, rows: Sequence[int], extra: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts, prompt_seen, bias) [n, V] of rows, counts plus the extra tokens of each row
        (the drafts before a speculative position)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        counts = self.output_counts.index_select(0, idx)
        pairs = [(i, t) for i, toks in enumerate(extra) for t in toks]
        if pairs:
            r = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=self.device)
            t = torch.tensor([t for _, t in pairs], dtype=torch.long, device=self.device)
            counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32), accumulate=True)
        return counts, self.prompt_seen.index_select(0, idx), self.bias.index_select(0, idx)
