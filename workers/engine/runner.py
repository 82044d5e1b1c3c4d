"""The model runner: turns a StepPlan into forward passes and sampled tokens.

Two kinds of forward run in a step:
- the ordinary one: prompt chunks and plain decode tokens of many sequences together; the last
  row of every chunk that reaches the end of its sequence is sampled;
- speculative decoding: the MTP depth drafts K tokens per sequence (chained: each draft's MTP
  output feeds the next), then one spec_verify forward scores [last token, drafts] and keeps
  the longest prefix of drafts that equals what the target would sample; the token after that
  prefix comes from the same forward, so every step yields 1..K+1 tokens.

MTP bookkeeping (per sequence): MTP entry i pairs the main model's hidden state at position i
with token i + 1. `mtp_cached` entries are in the MTP KV cache; `pending_hidden` holds the
hidden states of positions mtp_cached..cached_len-1, waiting for their next token. Drafting
first runs the pending entries (the true ones, overwriting any earlier draft entries), then
chains the drafts; verification leaves the accepted positions' hidden states pending again.

Verification (EngineConfig.spec_sampling). "coupled", the default: the token at position p is
argmax(filtered logits + noise(seed, p)); a draft for position p uses the same noise and is
accepted iff the target's own token at p equals it. So every emitted token is exactly the token
non-speculative decoding would emit, distributed exactly as the target model says (the drafts
only decide how many come per step); for greedy requests this is the longest matching prefix.
"rejection": drafts are drawn from the MTP distribution q with a noise stream of their own and
kept by the standard rule (sampling.rejection_verify): the same distribution, usually more
accepted drafts, but tokens differ from non-speculative decoding with the same seed.

Every sampled row (a prompt's first token, a decode token, a draft, a verification row) first
goes through logits.LogitsProcessor: penalties, logit_bias, min_tokens and the grammar mask of
its request, computed from the tokens before the row's position (drafts included), so both
modes keep their guarantees for constrained and penalized requests. The grammar masks are
started before each forward (they fill on a helper thread while the model runs); a draft is
pushed into its request's matcher, and verification settles the matcher on what it accepted.

Prefix-cache hits (scheduler.py, prefix_cache.py): every sequence keeps the hidden state of its
last cached position (`last_hidden`, what a snapshot stores); a sequence admitted with a hit
that covers all its tokens samples from it without a forward (`run_hits`). A prefill for
another engine sends only what the receiver lacks (positions from `seq.sink_from`): the part its
own hit covered comes from the cache, the rest as the layers compute it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baton.workers.engine.handoff import LayerState, StateKind
from baton.workers.engine.logits import LogitsProcessor, RowPlan
from baton.workers.engine.request import Sequence
from baton.workers.engine.sampling import (
    SampleRow,
    draft_tokens,
    rejection_verify,
    sample_tokens,
    token_logprobs,
)
from baton.workers.engine.scheduler import Chunk


@dataclass
class SampledToken:
    """One token chosen for a sequence, with its logprobs when asked for."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What the runner returns to the engine's update phase."""

    tokens: dict[int, list[SampledToken]] = field(default_factory=dict)
    """id(seq) -> tokens it gained this step, in order."""
    sink_errors: dict[int, BaseException] = field(default_factory=dict)
    """id(seq) -> the exception its PrefillSink raised (that prefill failed)."""
    prompt_tokens: int = 0
    """Tokens of prompt (or recomputed output) run through the model this step."""
    draft_tokens: int = 0
    accepted_tokens: int = 0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


class ModelRunner:
    """Builds ForwardBatch objects for the model and samples from its logits."""

    def __init__(self, model, cache, speculative_tokens: int, spec_sampling: str = "coupled",
                 step_graphs=None, tokenizer=None, eos_ids: frozenset[int] = frozenset()):
        from baton.workers.model.batch import ForwardBatch

        self._batch_cls = ForwardBatch
        self.model = model
        self.cache = cache
        self.step_graphs = step_graphs
        self.k = speculative_tokens
        self.spec_sampling = spec_sampling
        self.device = model.device
        self.num_layers = model.num_layers
        kinds = model.layer_kinds
        self.main_kinds = kinds[: self.num_layers]
        self.mtp_attention_layers = [
            self.num_layers + j
            for j, kind in enumerate(kinds[self.num_layers :])
            if kind == "attention"
        ]
        self.has_mtp = model.num_mtp_layers > 0
        self.logits = LogitsProcessor(int(model.config.vocab_size), self.device, tokenizer,
                                      eos_ids)
        """Penalties, logit_bias, min_tokens and grammar masks of every sampled row."""
        self._verify_masks = None
        self.logits_observer: Callable[[list[str], list[int], torch.Tensor], None] | None = None
        """Debugging hook: (request ids, positions, logits [n, V]) of every emitted token."""
        self.draft_observer: Callable[[list[str], list[int], torch.Tensor], None] | None = None
        """Debugging hook: (request ids, positions, MTP logits [n, V]) of every draft."""

    # ---- batches -------------------------------------------------------------------------

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(1, max(len(s.pages) for s in seqs))
        rows = [s.pages + [-1] * (width - len(s.pages)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32)

    def _batch(self, seqs, ids, starts, lens, spec_verify=False):
        # Host tensors: the model checks them and copies them over without waiting on the
        # device (ForwardBatch).
        positions = torch.tensor(
            [p for s, n in zip(starts, lens) for p in range(s, s + n)], dtype=torch.int64
        )
        return self._batch_cls(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=positions,
            seq_lens=list(lens),
            cached_lens=list(starts),
            block_tables=self._block_tables(seqs),
            state_slots=torch.tensor([s.slot for s in seqs], dtype=torch.int64),
            spec_verify=spec_verify,
        )

    def forward_batch(self, batch, cache, on_layer_done=None) -> torch.Tensor:
        """The main model's forward of a batch: decode and verify batches replay their
        batch-size bucket's CUDA graph when the engine made StepGraphs
        (workers/model/graphs.py); everything else runs eagerly."""
        if self.step_graphs is not None:
            return self.step_graphs.forward_batch(batch, cache, on_layer_done=on_layer_done)
        return self.model.forward_batch(batch, cache, on_layer_done=on_layer_done)

    def mtp_forward(self, prev_hidden, next_ids, batch, cache) -> torch.Tensor:
        """One MTP depth for the drafts, from its bucket's CUDA graph when the engine made
        StepGraphs; else eagerly."""
        if self.step_graphs is not None:
            return self.step_graphs.mtp_forward(prev_hidden, next_ids, batch, cache)
        return self.model.mtp_forward(prev_hidden, next_ids, batch, cache)

    def needs_mtp(self, seq: Sequence) -> bool:
        """Whether seq keeps MTP state: when this engine speculates, and always for a prefill
        for another engine (the decoder may speculate)."""
        return self.has_mtp and (self.k > 0 or seq.sink is not None)

    # ---- prefix-cache hits ---------------------------------------------------------------

    def run_hits(self, seqs: list[Sequence], out: StepOutput) -> None:
        """Sequences admitted with a hit this step: a prefill sink gets the cached part of
        its state; one whose every token was cached samples its next token now."""
        done = [s for s in seqs if s.uncached == 0]
        for seq in seqs:
            if seq.sink is not None:
                self._send_cached(seq, out, whole=seq.uncached == 0)
        if not done:
            return
        t0 = time.perf_counter()
        logits = self.model.compute_logits(torch.stack([s.last_hidden for s in done]))
        out.forward_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        positions = [len(s.tokens) for s in done]
        # The first output token: penalties, logit_bias, min_tokens and the grammar apply to
        # it as to a prefill's (the masks are filled here: there is no forward to overlap).
        plan = self.logits.begin(done, positions)
        tokens = self._sample(logits, done, positions, plan, self._raw_wanted(done))
        if plan is not None and plan.grammar_rows:
            self.logits.accept(done, tokens.tolist())
        if self.logits_observer is not None:
            self.logits_observer([s.request_id for s in done], positions, logits)
        for s, tok in zip(done, self._with_logprobs(logits, done, tokens)):
            out.tokens.setdefault(id(s), []).append(tok)
        out.sample_seconds += time.perf_counter() - t0

    def _send_cached(self, seq: Sequence, out: StepOutput, whole: bool) -> None:
        """State the sink needs that the hit took from the cache: KV [sink_from, hit), MTP KV
        [sink_from - 1, hit - 1); with whole, also the Mamba state and the last hidden state."""
        hit = seq.cached_len
        table = torch.tensor(seq.pages, dtype=torch.int32)
        start = seq.sink_from
        if start < hit:
            for layer, kind in enumerate(self.main_kinds):
                if kind == "attention":
                    kv = self.cache.read_state(layer, "kv", table, seq.slot, start, hit)
                    self._send(seq, out, LayerState(layer, StateKind.KV, start, hit, kv))
        mtp_start = max(start - 1, 0)
        if seq.needs_mtp and mtp_start < hit - 1:
            for layer in self.mtp_attention_layers:
                kv = self.cache.read_state(layer, "mtp_kv", table, seq.slot, mtp_start, hit - 1)
                self._send(seq, out, LayerState(layer, StateKind.MTP_KV, mtp_start, hit - 1, kv))
        if whole:
            for layer, kind in enumerate(self.main_kinds):
                if kind == "mamba":
                    self._send_mamba(seq, out, layer, table, hit)
            self._send_hidden(seq, out, seq.last_hidden)

    def _send_mamba(self, seq, out, layer: int, table, end: int) -> None:
        for name, sk in (("conv", StateKind.CONV), ("ssm", StateKind.SSM)):
            state = self.cache.read_state(layer, name, table, seq.slot, 0, end)
            self._send(seq, out, LayerState(layer, sk, 0, end, state))

    def _send_hidden(self, seq, out, hidden: torch.Tensor) -> None:
        n = len(seq.tokens)
        self._send(seq, out, LayerState(self.num_layers, StateKind.HIDDEN, n - 1, n,
                                        hidden.clone()))

    # ---- sampling ------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int],
                plan: RowPlan | None = None, keep_raw: bool = True):
        rows = [SampleRow(s.sampling, s.seed, p) for s, p in zip(seqs, positions)]
        return sample_tokens(self.logits.apply(logits, plan, in_place=not keep_raw), rows)

    def _raw_wanted(self, seqs: list[Sequence]) -> bool:
        # The raw logits are read after sampling for logprobs and by the debugging hook;
        # otherwise the logits processing may work in them instead of a copy.
        return self.logits_observer is not None or any(s.sampling.wants_logprobs for s in seqs)

    def _with_logprobs(self, logits, seqs, tokens) -> list[SampledToken]:
        ids = tokens.tolist()
        out = [SampledToken(t) for t in ids]
        want = [i for i, s in enumerate(seqs) if s.sampling.wants_logprobs]
        if want:
            idx = torch.tensor(want, device=logits.device)
            lps = token_logprobs(
                logits.index_select(0, idx),
                tokens.index_select(0, idx),
                [seqs[i].sampling.num_top_logprobs for i in want],
            )
            for i, lp in zip(want, lps):
                out[i].logprob, out[i].top_logprobs = lp.logprob, lp.top
        return out

    # ---- the ordinary forward ------------------------------------------------------------

    def run_chunks(self, chunks: list[Chunk], out: StepOutput) -> None:
        if not chunks:
            return
        seqs = [c.seq for c in chunks]
        ids = [t for c in chunks for t in c.seq.tokens[c.start : c.start + c.length]]
        batch = self._batch(seqs, ids, [c.start for c in chunks], [c.length for c in chunks])
        streaming = [i for i, c in enumerate(chunks) if c.seq.sink is not None]
        callback = None
        if streaming:
            callback = self._layer_streamer(chunks, streaming, batch.block_tables, out)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        seqs_s = [chunks[i].seq for i in sampling]
        positions = [len(s.tokens) for s in seqs_s]
        t0 = time.perf_counter()
        # Before the forward: grammar masks are computed while the model runs.
        plan = self.logits.begin(seqs_s, positions) if sampling else None
        out.sample_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        hidden = self.forward_batch(batch, self.cache, on_layer_done=callback)
        ends = torch.tensor([c.length for c in chunks]).cumsum(0) - 1
        logits = None
        if sampling:
            rows = ends[sampling].to(self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        out.forward_seconds += time.perf_counter() - t0
        # Decode tokens (one token after a cached prefix that ends the sequence) are output.
        out.prompt_tokens += sum(
            c.length
            for c in chunks
            if not (c.length == 1 and c.start > 0 and c.samples and c.start >= c.seq.num_prompt)
        )

        starts = [int(e) - c.length + 1 for e, c in zip(ends, chunks)]
        last = hidden.index_select(0, ends.to(self.device))
        for c, row in zip(chunks, last):
            c.seq.last_hidden = row
        mtp_chunks = [i for i, c in enumerate(chunks) if c.seq.needs_mtp]
        for i in mtp_chunks:
            seq, rows = chunks[i].seq, hidden[starts[i] : starts[i] + chunks[i].length]
            seq.pending_hidden = (
                rows.clone()
                if seq.pending_hidden is None
                else torch.cat([seq.pending_hidden, rows])
            )
        for c in chunks:
            c.seq.cached_len = c.start + c.length
        if mtp_chunks:
            t0 = time.perf_counter()
            self._run_mtp_entries([chunks[i].seq for i in mtp_chunks], out)
            out.forward_seconds += time.perf_counter() - t0

        if sampling:
            t0 = time.perf_counter()
            tokens = self._sample(logits, seqs_s, positions, plan, self._raw_wanted(seqs_s))
            if plan is not None and plan.grammar_rows:
                self.logits.accept(seqs_s, tokens.tolist())
            if self.logits_observer is not None:
                self.logits_observer([s.request_id for s in seqs_s], positions, logits)
            for s, tok in zip(seqs_s, self._with_logprobs(logits, seqs_s, tokens)):
                out.tokens.setdefault(id(s), []).append(tok)
            out.sample_seconds += time.perf_counter() - t0
        for i in streaming:
            c = chunks[i]
            if c.samples and id(c.seq) not in out.sink_errors:
                self._send_hidden(c.seq, out, c.seq.last_hidden)

    def _send(self, seq: Sequence, out: StepOutput, state: LayerState) -> None:
        if id(seq) in out.sink_errors:
            return
        try:
            seq.sink.on_layer(state)
        except Exception as exc:  # one failed transfer must not stop the whole batch
            out.sink_errors[id(seq)] = exc

    def _layer_streamer(self, chunks, streaming, tables, out) -> Callable[[int], None]:
        def on_layer_done(layer: int) -> None:
            kind = self.main_kinds[layer]
            for i in streaming:
                c = chunks[i]
                seq, end = c.seq, c.start + c.length
                start = max(c.start, seq.sink_from)  # the receiver holds what comes before
                if kind == "attention" and start < end:
                    kv = self.cache.read_state(layer, "kv", tables[i], seq.slot, start, end)
                    self._send(seq, out, LayerState(layer, StateKind.KV, start, end, kv))
                elif kind == "mamba" and end == len(seq.tokens):
                    self._send_mamba(seq, out, layer, tables[i], end)

        return on_layer_done

    # ---- MTP -----------------------------------------------------------------------------

    def flush_mtp(self, seqs: list[Sequence]) -> None:
        """Finishing sequences: write the pending MTP entries of positions before
        cached_len - 1, so a snapshot at cached_len finds MTP KV [0, cached_len - 1)."""
        self._run_mtp_entries(seqs, StepOutput(), lambda s: s.cached_len - 1)

    def _run_mtp_entries(self, seqs: list[Sequence], out: StepOutput, upto=None) -> None:
        """Write the MTP KV of every pending entry whose next token is known (up to position
        upto(seq), exclusive, when given)."""
        todo = []
        for s in seqs:
            end = min(s.cached_len, len(s.tokens) - 1)
            if upto is not None:
                end = min(end, upto(s))
            n = end - s.mtp_cached
            if n > 0 and s.pending_hidden is not None:
                todo.append((s, n))
        if not todo:
            return
        seqs_t = [s for s, _ in todo]
        starts = [s.mtp_cached for s in seqs_t]
        lens = [n for _, n in todo]
        next_ids = [t for s, n in todo for t in s.tokens[s.mtp_cached + 1 : s.mtp_cached + 1 + n]]
        batch = self._batch(seqs_t, next_ids, starts, lens)
        prev = torch.cat([s.pending_hidden[:n] for s, n in todo])
        self.model.mtp_forward(prev, batch.input_ids, batch, self.cache)
        for i, (s, n) in enumerate(todo):
            start, end = max(s.mtp_cached, s.sink_from - 1), s.mtp_cached + n
            if s.sink is not None and start < end:
                for layer in self.mtp_attention_layers:
                    kv = self.cache.read_state(
                        layer, "mtp_kv", batch.block_tables[i], s.slot, start, end
                    )
                    self._send(s, out, LayerState(layer, StateKind.MTP_KV, start, end, kv))
            s.pending_hidden = s.pending_hidden[n:]
            s.mtp_cached += n

    # ---- speculative decoding ------------------------------------------------------------

    def draft(self, seqs: list[Sequence]) -> list[list[int]]:
        """seq.spec_tokens MTP drafts per sequence, for positions len(tokens) onwards.

        Drafts are sampled from logits processed like the target's (penalties counting the
        drafts before them, the grammar advanced through them), so a draft the target would
        never emit is not proposed. The grammar masks of depth d are those of verification
        row d: they go straight into the verification's mask rows (self._verify_masks).
        """
        k = [s.spec_tokens for s in seqs]
        n_tokens = [len(s.tokens) for s in seqs]
        # Mask row of (sequence i, depth d) in the verification batch: first[i] + d.
        first = [0, *torch.tensor([1 + x for x in k]).cumsum(0).tolist()[:-1]]
        grammar = any(self.logits.has_grammar(s) for s in seqs)
        self._verify_masks = self.logits.new_masks(sum(k) + len(seqs)) if grammar else None
        drafts: list[list[int]] = [[] for _ in seqs]
        active = [i for i in range(len(seqs)) if k[i] > 0]

        def plan_depth(depth: int) -> RowPlan | None:
            # Started before the MTP forward of this depth: the masks overlap it.
            return self.logits.begin(
                [seqs[i] for i in active], [n_tokens[i] + depth for i in active],
                drafts=[drafts[i] for i in active], masks=self._verify_masks,
                mask_rows=[first[i] + depth for i in active])

        plan = plan_depth(0)
        # The pending true entries first; the last output row drafts position N.
        lens = [s.pending_hidden.shape[0] for s in seqs]
        starts = [s.mtp_cached for s in seqs]
        next_ids = [t for s, m in zip(seqs, lens) for t in s.tokens[s.mtp_cached + 1 :][:m]]
        batch = self._batch(seqs, next_ids, starts, lens)
        prev = torch.cat([s.pending_hidden for s in seqs])
        g = self.mtp_forward(prev, batch.input_ids, batch, self.cache)
        g = g[torch.tensor(lens).cumsum(0).to(self.device) - 1]
        for s, m in zip(seqs, lens):
            s.mtp_cached += m
            s.pending_hidden = None
        g = g[torch.tensor(active, dtype=torch.long, device=self.device)]
        # Rejection mode: the distribution each draft was drawn from (q), per sequence.
        self._draft_probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for depth in range(max(k, default=0)):
            if depth > 0:
                plan = plan_depth(depth)
                # Chain: the previous draft's MTP output and token make the next entry. These
                # entries sit past mtp_cached and are overwritten once the true ones exist.
                act = [seqs[i] for i in active]
                pos = [n_tokens[i] - 2 + depth for i in active]
                batch = self._batch(act, [drafts[i][-1] for i in active], pos, [1] * len(act))
                g = self.mtp_forward(g, batch.input_ids, batch, self.cache)
            logits = self.model.compute_logits(g)
            act = [seqs[i] for i in active]
            positions = [n_tokens[i] + depth for i in active]
            if self.draft_observer is not None:
                self.draft_observer([s.request_id for s in act], positions, logits)
            # Draft logits are not read after sampling (the observer has seen them).
            if self.spec_sampling == "coupled":
                toks = self._sample(logits, act, positions, plan, keep_raw=False).tolist()
            else:
                rows = [SampleRow(s.sampling, s.seed, p) for s, p in zip(act, positions)]
                tokens, q = draft_tokens(self.logits.apply(logits, plan, in_place=True), rows)
                toks = tokens.tolist()
                for i, q_row in zip(active, q):
                    self._draft_probs[i].append(q_row)
            for i, t in zip(active, toks):
                drafts[i].append(t)
            if grammar:
                self.logits.push(act, toks)
            keep = [j for j, i in enumerate(active) if depth + 1 < k[i]]
            g = g[keep]
            active = [active[j] for j in keep]
        if grammar:
            # The masks after the last draft (the bonus rows), while the verify forward runs.
            self.logits.begin(seqs, [n + x for n, x in zip(n_tokens, k)], drafts=drafts,
                              masks=self._verify_masks,
                              mask_rows=[f + x for f, x in zip(first, k)])
        return drafts

    def run_speculative(self, seqs: list[Sequence], out: StepOutput) -> None:
        if not seqs:
            return
        t0 = time.perf_counter()
        n_tokens = [len(s.tokens) for s in seqs]
        drafts = self.draft(seqs)
        # Verify [last token, drafts] in one forward that keeps per-token Mamba states.
        ids = [t for s, d in zip(seqs, drafts) for t in [s.tokens[-1], *d]]
        lens = [1 + len(d) for d in drafts]
        batch = self._batch(seqs, ids, [s.cached_len for s in seqs], lens, spec_verify=True)
        hidden = self.forward_batch(batch, self.cache)
        logits = self.model.compute_logits(hidden)
        out.forward_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        row_seqs = [s for s, n in zip(seqs, lens) for _ in range(n)]
        row_pos = [n_tokens[i] + j for i, n in enumerate(lens) for j in range(n)]
        # Row (i, j) sees the j drafts before it as output, and the grammar after them.
        plan = self.logits.begin(
            row_seqs, row_pos, drafts=[d[:j] for d, n in zip(drafts, lens) for j in range(n)],
            masks=self._verify_masks, mask_rows=list(range(len(row_seqs))),
            compute_masks=False)
        emitted: list[list[int]] = []
        keep_raw = self._raw_wanted(seqs)
        if self.spec_sampling == "coupled":
            target = self._sample(logits, row_seqs, row_pos, plan, keep_raw).tolist()
            row = 0
            for d, n in zip(drafts, lens):
                j = 0
                while j < len(d) and d[j] == target[row + j]:
                    j += 1
                emitted.append(target[row : row + j + 1])
                row += n
        else:
            processed = self.logits.apply(logits, plan, in_place=not keep_raw)
            row = 0
            for i, (s, n) in enumerate(zip(seqs, lens)):
                rows = [SampleRow(s.sampling, s.seed, p) for p in row_pos[row : row + n]]
                q = torch.stack(self._draft_probs[i]) if drafts[i] else None
                emitted.append(rejection_verify(processed[row : row + n], q, drafts[i], rows))
                row += n
        self._verify_masks = None
        if plan is not None and plan.grammar_rows:
            for s, e in zip(seqs, emitted):
                self.logits.settle(s, e)
        starts = torch.tensor([0, *lens[:-1]]).cumsum(0).tolist()
        keep = [start + j for start, e in zip(starts, emitted) for j in range(len(e))]
        keep_rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        kept_logits = logits.index_select(0, keep_rows)
        kept_seqs = [row_seqs[r] for r in keep]
        kept_tokens = torch.tensor([t for e in emitted for t in e], device=self.device)
        sampled = self._with_logprobs(kept_logits, kept_seqs, kept_tokens)
        if self.logits_observer is not None:
            self.logits_observer(
                [s.request_id for s in kept_seqs], [row_pos[r] for r in keep], kept_logits
            )
        accepted = []
        at = 0
        for i, s in enumerate(seqs):
            j = len(emitted[i]) - 1
            accepted.append(1 + j)
            out.tokens.setdefault(id(s), []).extend(sampled[at : at + j + 1])
            at += j + 1
            s.pending_hidden = hidden[starts[i] : starts[i] + j + 1].clone()
            s.last_hidden = s.pending_hidden[-1]
            s.cached_len += 1 + j
            out.draft_tokens += len(drafts[i])
            out.accepted_tokens += j
        self.cache.accept(
            torch.tensor([s.slot for s in seqs], dtype=torch.int64, device=self.device),
            torch.tensor(accepted, dtype=torch.int64, device=self.device),
        )
        out.sample_seconds += time.perf_counter() - t0
