"""The scheduler: which sequences run this step, with how many tokens, on which cache rows.

Policy (one step):
1. Running sequences ready to decode go first (1 token each, or 1 + K drafts when speculative
   decoding is on). A sequence that needs a new KV page and finds none preempts the newest
   running sequence (its cache is freed; it goes back to the head of the queue and is
   recomputed later: prompt + generated tokens), possibly itself.
2. Running sequences still prefilling get chunks from what is left of max_batch_tokens.
3. Waiting sequences are admitted in arrival order while there is a free state slot, pages for
   their whole prompt plus a page of headroom per running sequence, and token budget. The head
   of the queue is never overtaken, so a long prompt cannot starve.
KV pages for a prompt are taken at admission; decode pages are taken one at a time.

With a prefix cache, admission first looks up the longest cached prefix (KV pages and a Mamba
snapshot, prefix_cache.py): the sequence shares those pages, gets the snapshot's state in its
slot and computes only the rest; a hit that covers every token needs no forward at all (the
runner samples from the snapshot's hidden state). Prefill chunks end on multiples of
snapshot_interval, so the slot's state at such a chunk end is the snapshot taken there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from baton.workers.engine.allocator import PageAllocator, SlotPool
from baton.workers.engine.prefix_cache import Hit, PrefixCache
from baton.workers.engine.request import Phase, Sequence


@dataclass
class Chunk:
    """Tokens of one sequence fed to the model in this step's ordinary (non-verify) forward."""

    seq: Sequence
    start: int
    """Position of the first token fed (== tokens already cached)."""
    length: int
    """Tokens fed: tokens[start : start + length]."""
    decode: bool = False
    """One generated token after the cached sequence (decoding), not a piece of a prompt."""

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so its last row yields the next token."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class StepPlan:
    """What the scheduler hands the model runner for one step (plain data)."""

    chunks: list[Chunk] = field(default_factory=list)
    """Prefill chunks and plain decode tokens, run together in one forward."""
    speculative: list[Sequence] = field(default_factory=list)
    """Sequences decoding with MTP drafts (draft K, verify 1 + K in one forward)."""
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences whose cache was freed this step; they wait to be recomputed."""
    admitted: list[Sequence] = field(default_factory=list)
    """Sequences that left the queue this step."""
    hits: list[Sequence] = field(default_factory=list)
    """Admitted with a prefix-cache hit: a prefill sink gets the cached part of the state, and
    a sequence whose every token was cached samples its next token without a forward."""

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.speculative and not self.hits

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks) + sum(1 + s.spec_tokens for s in self.speculative)


class Scheduler:
    """Owns the waiting queue, the running list and both cache allocators."""

    def __init__(
        self,
        pages: PageAllocator,
        slots: SlotPool,
        max_num_seqs: int,
        max_batch_tokens: int,
        speculative_tokens: int,
        prefix: PrefixCache | None = None,
        snapshot_interval: int = 0,
    ) -> None:
        self.pages = pages
        self.slots = slots
        self.prefix = prefix
        self.snapshot_interval = snapshot_interval if prefix is not None else 0
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.k = speculative_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_reserved = 0
        """Handoff reservations: they hold a slot and pages and count against max_num_seqs."""
        self.pending_hits: list[Sequence] = []
        """Running sequences admitted outside schedule() (a local prefill) whose every token
        was cached: the next plan samples them (plan.hits)."""
        self.preemptions_total = 0
        self._turn = 0

    # ---- membership ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def start_running(self, seq: Sequence) -> None:
        """A sequence whose cache is already filled (a committed handoff) joins the batch."""
        seq.phase = Phase.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the engine and free its cache (finish or abort)."""
        if seq.phase == Phase.WAITING:
            self.waiting.remove(seq)
        elif seq.phase == Phase.RUNNING:
            self.running.remove(seq)
        self.free_cache(seq)
        seq.phase = Phase.FINISHED

    def free_cache(self, seq: Sequence) -> None:
        if seq.pages:
            self.pages.free(seq.pages)
            seq.pages = []
        if seq.slot >= 0:
            self.slots.free([seq.slot])
            seq.slot = -1
        seq.cached_len = 0
        seq.mtp_cached = 0
        seq.pending_hidden = None
        seq.last_hidden = None
        keys = seq.cache_keys
        keys.node, keys.published, keys.broken = None, 0, False

    # ---- the prefix cache ----------------------------------------------------------------

    def lookup(self, seq: Sequence, limit: int | None = None) -> Hit | None:
        """The sequence's longest cached prefix (None without a prefix cache)."""
        if self.prefix is None:
            return None
        return self.prefix.lookup(seq.cache_keys, seq.tokens, seq.needs_mtp, limit)

    def pages_to_admit(self, hit: Hit | None, total: int) -> int:
        """Free pages that admitting a sequence of `total` pages with `hit` takes."""
        return total if hit is None else self.prefix.pages_needed(hit, total)

    def take_cache(self, seq: Sequence, hit: Hit | None, total: int,
                   restore_state: bool = True) -> None:
        """Gives seq a slot and `total` pages; with a hit, shares the cached prefix and (with
        restore_state) puts the snapshot's Mamba state into the slot."""
        seq.slot = self.slots.allocate_one()
        if hit is None:
            seq.pages = self.pages.allocate(total)
            seq.cached_tokens = 0
            if self.prefix is not None:
                self.prefix.count_lookup(len(seq.tokens), 0)
            return
        prefix = self.prefix
        seq.pages = prefix.take(hit, total - len(hit.pages))
        prefix.attach(seq.cache_keys, hit)
        prefix.count_lookup(len(seq.tokens), hit.position)
        seq.cached_tokens = hit.position
        if restore_state:
            hidden = prefix.restore(hit, seq.slot)
            seq.cached_len = hit.position
            seq.last_hidden = hidden
            if seq.needs_mtp:
                # Entry position - 1 pairs this hidden state with the token after the hit:
                # it is recomputed here (into the private tail copy), like any pending entry.
                seq.mtp_cached = hit.position - 1
                seq.pending_hidden = hidden[None]

    def chunk_length(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens of seq to feed now: at most budget, ending at the next multiple of
        snapshot_interval or the next of the request's snapshot points when one comes before
        the end (a snapshot is taken there)."""
        n = min(seq.uncached, budget)
        interval = self.snapshot_interval
        if interval:
            boundary = (seq.cached_len // interval + 1) * interval
            if boundary < seq.cached_len + n:
                n = boundary - seq.cached_len
        if self.prefix is not None:
            for point in seq.request.snapshot_points:
                if seq.cached_len < point < seq.cached_len + n:
                    return point - seq.cached_len
        return n

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.free_cache(seq)
        seq.phase = Phase.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        plan.chunks = [c for c in plan.chunks if c.seq is not seq]
        plan.speculative = [s for s in plan.speculative if s is not seq]
        self.preemptions_total += 1

    # ---- one step ------------------------------------------------------------------------

    def decode_ready(self, seq: Sequence) -> bool:
        return seq.uncached == 1 and seq.cached_len > 0

    def draft_length(self, seq: Sequence) -> int:
        """MTP drafts for seq this step (0: decode without speculation)."""
        if self.k == 0 or seq.sink is not None or not self.decode_ready(seq):
            return 0
        if seq.pending_hidden is None or seq.pending_hidden.shape[0] == 0:
            return 0
        # Drafts past the request's last token would be thrown away.
        return max(0, min(self.k, seq.max_len - len(seq.tokens)))

    def _grow(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Make seq's pages hold num_tokens, preempting newer sequences; False: seq preempted."""
        need = self.pages.pages_for(num_tokens) - len(seq.pages)
        while need > self.pages.num_free:
            victims = [s for s in self.running if s.sink is None]
            victim = victims[-1] if victims else seq
            self._preempt(victim, plan)
            if victim is seq:
                return False
        if need > 0:
            seq.pages.extend(self.pages.allocate(need))
        return True

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        plan.hits = [s for s in self.pending_hits if s.phase == Phase.RUNNING]
        self.pending_hits = []
        budget = self.max_batch_tokens
        # Decodes start at a rotating offset: when the token budget cannot take every
        # sequence's 1 + K tokens, a different one waits each step (nobody starves).
        turn = self._turn % max(1, len(self.running))
        self._turn += 1
        for seq in self.running[turn:] + self.running[:turn]:
            if seq.phase != Phase.RUNNING or not self.decode_ready(seq):
                continue
            if budget == 0:
                break
            k = min(self.draft_length(seq), budget - 1)
            # Verification writes k draft positions past the last token.
            if not self._grow(seq, len(seq.tokens) + k, plan):
                continue
            budget -= 1 + k
            seq.spec_tokens = k
            if k:
                plan.speculative.append(seq)
            else:
                # The last prompt token, when it is all that is left, is not decoding.
                decode = seq.cached_len >= seq.num_prompt
                plan.chunks.append(Chunk(seq, seq.cached_len, 1, decode=decode))
        for seq in self.running:
            if budget == 0:
                break
            if self.decode_ready(seq) or seq.uncached == 0:
                continue
            n = self.chunk_length(seq, budget)
            plan.chunks.append(Chunk(seq, seq.cached_len, n))
            budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + self.num_reserved >= self.max_num_seqs:
                break
            total = self.pages.pages_for(len(seq.tokens) + 1)
            hit = self.lookup(seq)
            pages = self.pages_to_admit(hit, total)
            headroom = len(self.running)
            if self.slots.num_free == 0 or pages + headroom > self.pages.num_free:
                # Alone it always fits (EngineConfig checks num_pages), so it can only wait
                # for running sequences to finish.
                if self.running or self.num_reserved or self.slots.num_free == 0:
                    break
                if pages > self.pages.num_free:
                    if total > self.pages.num_free:
                        break
                    hit, pages = None, total  # keeping the hit's snapshot page does not fit
            self.waiting.popleft()
            self.take_cache(seq, hit, total)
            seq.phase = Phase.RUNNING
            self.running.append(seq)
            plan.admitted.append(seq)
            if hit is not None:
                plan.hits.append(seq)
            if seq.uncached == 0:
                continue  # every token was cached: the runner samples from the snapshot
            n = self.chunk_length(seq, budget)
            plan.chunks.append(Chunk(seq, seq.cached_len, n))
            budget -= n
        return plan
