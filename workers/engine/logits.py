"""What happens to a row of logits between the model and the sampler, per request.

For every sampled row (the prefill's first token, a decode token, an MTP draft, a verification
row) of a request that asks for any of it, in this order:

    1. logit_bias, then repetition_penalty, frequency_penalty, presence_penalty (penalties.py)
    2. the grammar's token mask: tokens it forbids get -inf (grammar.py)
    3. min_tokens: eos and stop_token_ids get -inf while fewer than min_tokens output tokens
       exist, unless that leaves nothing (a grammar that must end now wins over min_tokens)

then the sampler (sampling.py) applies temperature, top-k / top-p and the (seed, position)
noise as before. Every input of a row is a function of the request's tokens up to the row's
position (its output counts, its grammar state), never of the batch or the worker, so a seeded
token stays the same wherever it is sampled (DESIGN.md, Seams), and a speculative row sees
exactly what the same position would see without speculation (coupled verification keeps
giving identical tokens). Logprobs are reported from the model's logits before any of this.

The runner calls `begin(...)` before its forward pass: it brings each request's state up to
date with the tokens the engine appended since (counts: one scatter for the batch; grammar:
the matchers consume them) and starts the grammar masks on a helper thread; `apply(logits,
plan)` after the forward waits for the masks and processes the rows; `accept` / `push` /
`settle` move the grammar matchers on with what was sampled.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from baton.workers.engine.grammar import GrammarCompiler, GrammarState, MaskBatch, MaskComputer
from baton.workers.engine.penalties import PenaltyRow, PenaltyTable, apply_penalties
from baton.workers.engine.request import Request, Sequence


@dataclass
class SamplerState:
    """A sequence's inputs to logits processing (kept in Sequence.sampler_state)."""

    stop_ids: list[int]
    """Token ids min_tokens holds back: the sequence's eos ids and stop_token_ids."""
    penalty_row: PenaltyRow | None = None
    """Its token counts (None: no penalty)."""
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    """logit_bias as device tensors (None: none)."""
    counted: int = 0
    """tokens[:counted] are in the penalty row."""
    grammar: GrammarState | None = None


_NOTHING = SamplerState(stop_ids=[])
"""The state of every sequence that asks for no processing (checked once per sequence)."""


@dataclass
class RowPlan:
    """One batch of rows to process: which rows need what (indices into the batch)."""

    seqs: list[Sequence]
    bias_rows: list[int] = field(default_factory=list)
    penalty_rows: list[int] = field(default_factory=list)
    table_rows: list[PenaltyRow] = field(default_factory=list)
    extra: list[list[int]] = field(default_factory=list)
    """The drafts before each penalized row (counted as output there)."""
    min_rows: list[int] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)
    """(min_rows[i], min_tokens[i]) pairs to mask while min_tokens is not reached."""
    grammar_rows: list[int] = field(default_factory=list)
    mask_rows: list[int] = field(default_factory=list)
    """grammar_rows[i] takes bitmask row mask_rows[i] of `masks`."""
    masks: MaskBatch | None = None

    @property
    def empty(self) -> bool:
        return not (self.bias_rows or self.penalty_rows or self.min_rows or self.grammar_rows)


class LogitsProcessor:
    """Per-request logits processing for one engine (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str,
        tokenizer: Any | None = None,
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.grammars = (
            GrammarCompiler(tokenizer, vocab_size, sorted(eos_ids)) if tokenizer is not None
            else None
        )
        self.masks = MaskComputer(vocab_size, self.device)
        self._table: PenaltyTable | None = None

    # ---- admission -----------------------------------------------------------------------

    def check_request(self, request: Request) -> None:
        """ValueError naming what in request the engine cannot take (sampling.validate() is
        assumed); compiles the grammar (cached), so call it off the engine thread first."""
        sp = request.sampling
        outside = sorted(t for t in sp.logit_bias if t >= self.vocab_size)
        if outside:
            raise ValueError(
                f"SamplingParams.logit_bias is invalid: token {outside[0]} is outside the "
                f"vocabulary of {self.vocab_size} tokens"
            )
        n_out = request.num_output_tokens
        if isinstance(n_out, bool) or not isinstance(n_out, int) or not (
            0 <= n_out < len(request.prompt_ids)
        ):
            raise ValueError(
                f"num_output_tokens={n_out!r} of {request.request_id!r} is invalid: an integer "
                f"in [0, {len(request.prompt_ids)}) (the earlier attempt's output must leave "
                "a prompt)"
            )
        if not sp.grammar:
            return
        if self.grammars is None:
            raise ValueError(
                "SamplingParams.grammar is not supported by this engine: it has no tokenizer "
                "to compile grammars against"
            )
        self.grammars.compile(sp.grammar)
        if n_out:
            outputs = request.prompt_ids[-n_out:]
            taken = self.grammars.count_accepted(sp.grammar, outputs)
            if taken < n_out:
                raise ValueError(
                    f"num_output_tokens={n_out} of {request.request_id!r} is invalid: the "
                    f"grammar refuses output token {taken} (id {outputs[taken]}) of the "
                    "earlier attempt"
                )

    def prepare(self, request: Request) -> None:
        """Compile the request's grammar now (cached; ValueError if it cannot compile)."""
        grammar = request.sampling.grammar
        if grammar and isinstance(grammar, str) and self.grammars is not None:
            self.grammars.compile(grammar)

    # ---- per-sequence state --------------------------------------------------------------

    def state(self, seq: Sequence) -> SamplerState:
        st = seq.sampler_state
        if st is None:
            st = seq.sampler_state = self._new_state(seq)
        return st

    def _new_state(self, seq: Sequence) -> SamplerState:
        sp = seq.sampling
        if not (sp.has_penalties or sp.logit_bias or sp.min_tokens or sp.grammar):
            return _NOTHING
        stops = sorted({t for t in (*seq.eos_ids, *sp.stop_token_ids) if t < self.vocab_size})
        st = SamplerState(stop_ids=stops)
        start = seq.output_start
        if sp.has_penalties:
            if self._table is None:
                self._table = PenaltyTable(self.vocab_size, self.device)
            st.counted = len(seq.tokens)
            st.penalty_row = self._table.add(seq, seq.tokens[:start], seq.tokens[start:])
        if sp.logit_bias:
            ids = sorted(sp.logit_bias)
            st.bias_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            st.bias_values = torch.tensor([sp.logit_bias[t] for t in ids],
                                          dtype=torch.float32, device=self.device)
        if sp.grammar:
            st.grammar = self.grammars.new_state(sp.grammar, start)
        return st

    def grammar_complete(self, seq: Sequence, token: int, length: int) -> bool:
        """Whether the grammar ends the request once it holds `length` tokens, the last one
        `token` (it may not be appended yet)."""
        st = self.state(seq)
        g = st.grammar
        if g is None:
            return False
        if g.consumed < length and not g.pushed:
            g.advance(seq.tokens, min(length - 1, len(seq.tokens)))
            if g.consumed == length - 1:
                g.consume(token)
        return g.stopped_at is not None and g.stopped_at <= length

    def grammar_refused(self, seq: Sequence) -> bool:
        """Whether the grammar refused one of seq's tokens (grammar_complete was true)."""
        g = self.state(seq).grammar
        return g is not None and g.refused_at is not None

    # ---- a batch of rows -----------------------------------------------------------------

    def begin(
        self,
        seqs: Seq[Sequence],
        positions: Seq[int],
        drafts: Seq[Seq[int]] | None = None,
        masks: MaskBatch | None = None,
        mask_rows: Seq[int] | None = None,
        compute_masks: bool = True,
    ) -> RowPlan | None:
        """Plan rows i = (seqs[i], positions[i]), drafts[i] being the speculative tokens
        between the sequence's tokens and that position; start their grammar masks into masks
        (rows mask_rows[i]; a new batch when None) unless compute_masks is False (filled
        already, e.g. while drafting). None when no row needs anything."""
        plan = RowPlan(list(seqs))
        jobs = []
        new_counts: list[tuple[PenaltyRow, list[int]]] = []
        for i, (seq, pos) in enumerate(zip(seqs, positions)):
            st = self.state(seq)
            if st is _NOTHING:
                continue
            extra = list(drafts[i]) if drafts is not None else []
            if st.bias_ids is not None:
                plan.bias_rows.append(i)
            if st.penalty_row is not None:
                if st.counted < len(seq.tokens):
                    new_counts.append((st.penalty_row, seq.tokens[st.counted :]))
                    st.counted = len(seq.tokens)
                plan.penalty_rows.append(i)
                plan.table_rows.append(st.penalty_row)
                plan.extra.append(extra)
            sp = seq.sampling
            if sp.min_tokens and pos - seq.output_start < sp.min_tokens and st.stop_ids:
                plan.min_rows.extend([i] * len(st.stop_ids))
                plan.min_tokens.extend(st.stop_ids)
            g = st.grammar
            if g is not None:
                if not g.pushed:
                    g.advance(seq.tokens)
                row = mask_rows[i] if mask_rows is not None else len(plan.grammar_rows)
                plan.grammar_rows.append(i)
                plan.mask_rows.append(row)
                # A row after a draft the grammar refused is discarded by verification:
                # leave it unconstrained rather than mask it with the wrong state.
                if compute_masks and g.consumed + g.pushed == pos:
                    jobs.append((g.matcher, row))
        if new_counts:
            self._table.count([r for r, _ in new_counts], [t for _, t in new_counts])
        if plan.grammar_rows:
            plan.masks = masks if masks is not None else self.masks.new_batch(
                len(plan.grammar_rows))
            self.masks.start(plan.masks, jobs)
        return None if plan.empty else plan

    def new_masks(self, rows: int) -> MaskBatch:
        return self.masks.new_batch(rows)

    def apply(self, logits: torch.Tensor, plan: RowPlan | None,
              in_place: bool = False) -> torch.Tensor:
        """Processed fp32 logits [n, V] (logits itself when nothing applies). logits is left
        as it was unless in_place (nobody reads the raw logits afterwards: no logprobs)."""
        if plan is None:
            return logits
        n = logits.shape[0]
        dev = logits.device
        rows = sorted({*plan.bias_rows, *plan.penalty_rows, *plan.grammar_rows, *plan.min_rows})
        local = {r: j for j, r in enumerate(rows)}
        every_row = len(rows) == n
        # Only the rows that need it, in fp32: [m, V].
        reuse = in_place and logits.dtype == torch.float32
        if every_row:
            x = logits if reuse else logits.to(torch.float32, copy=True)
        else:
            x = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev)).float()

        def select(batch_rows: list[int]) -> torch.Tensor | None:
            # Local indices of batch_rows, None when they are all of x (no gather needed).
            if len(batch_rows) == len(rows):
                return None
            return torch.tensor([local[r] for r in batch_rows], dtype=torch.long, device=dev)

        if plan.bias_rows:
            states = [plan.seqs[i].sampler_state for i in plan.bias_rows]
            r = torch.cat([torch.full_like(st.bias_ids, local[i])
                           for i, st in zip(plan.bias_rows, states)])
            x.index_put_((r, torch.cat([st.bias_ids for st in states])),
                         torch.cat([st.bias_values for st in states]), accumulate=True)
        if plan.penalty_rows:
            rows_, tokens, counts = self._table.entries(plan.table_rows, plan.extra)
            sps = [plan.seqs[i].sampling for i in plan.penalty_rows]

            def per_row(name: str, off: float) -> torch.Tensor | None:
                values = [getattr(sp, name) for sp in sps]
                if all(v == off for v in values):
                    return None  # off for every row: skip its passes over the vocabulary
                return torch.tensor(values, dtype=torch.float32, device=dev)

            idx = select(plan.penalty_rows)
            part = x if idx is None else x.index_select(0, idx)
            part = apply_penalties(part, rows_, tokens, counts,
                                   per_row("presence_penalty", 0.0),
                                   per_row("frequency_penalty", 0.0),
                                   per_row("repetition_penalty", 1.0))
            if idx is None:
                x = part
            else:
                x.index_copy_(0, idx, part)
        if plan.grammar_rows:
            plan.masks.wait()
            words = plan.masks.words
            if plan.mask_rows != list(range(words.shape[0])):
                words = words.index_select(0, torch.tensor(plan.mask_rows, dtype=torch.long))
            bias = self.masks.mask_bias(words)
            idx = select(plan.grammar_rows)
            if idx is None:
                x.add_(bias)
            else:
                x.index_copy_(0, idx, x.index_select(0, idx).add_(bias))
        if plan.min_rows:
            unique = sorted(set(plan.min_rows))
            at = {r: j for j, r in enumerate(unique)}
            idx = torch.tensor([local[r] for r in unique], dtype=torch.long, device=dev)
            before = x.index_select(0, idx)
            held = before.clone()
            r = torch.tensor([at[i] for i in plan.min_rows], dtype=torch.long, device=dev)
            t = torch.tensor(plan.min_tokens, dtype=torch.long, device=dev)
            held[r, t] = float("-inf")
            alive = torch.isfinite(held).any(dim=1, keepdim=True)
            x.index_copy_(0, idx, torch.where(alive, held, before))
        if every_row:
            return x
        out = logits if reuse else logits.to(torch.float32, copy=True)
        return out.index_copy_(0, torch.tensor(rows, dtype=torch.long, device=dev), x)

    # ---- moving the grammar on -----------------------------------------------------------

    def accept(self, seqs: Seq[Sequence], tokens: Seq[int]) -> None:
        """Each sequence sampled tokens[i] at index len(seq.tokens) (not appended yet)."""
        for seq, token in zip(seqs, tokens):
            g = seq.sampler_state.grammar if seq.sampler_state is not None else None
            if g is not None:
                g.advance(seq.tokens)
                g.consume(token)

    def push(self, seqs: Seq[Sequence], drafts: Seq[int]) -> None:
        """Speculatively advance each sequence's grammar by a draft."""
        for seq, token in zip(seqs, drafts):
            g = seq.sampler_state.grammar if seq.sampler_state is not None else None
            if g is not None:
                g.push(token)

    def settle(self, seq: Sequence, emitted: Seq[int]) -> None:
        """Verification emitted these tokens (accepted drafts, then the target's own)."""
        g = seq.sampler_state.grammar if seq.sampler_state is not None else None
        if g is not None:
            g.settle(len(emitted) - 1)
            g.consume(emitted[-1])

    def has_grammar(self, seq: Sequence) -> bool:
        return self.state(seq).grammar is not None
