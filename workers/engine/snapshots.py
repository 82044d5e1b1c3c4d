"""When the engine publishes pages and takes Mamba snapshots for its prefix cache.

Always from committed state, after a step's forward and update (never from speculation
buffers: a snapshot holds only what verification accepted):
- full pages are published once their KV (and, for a sequence that keeps MTP state, their MTP
  entries, whose last one pairs with the next page's first token) are final;
- a snapshot at every prefill chunk end that ends a prompt (or a recomputation), falls on a
  multiple of snapshot_interval, or on one of the request's snapshot points (the router's
  message boundaries; the scheduler ends chunks at all of these), so long shared prompts and
  re-rendered chat histories hit;
- a snapshot when a handed-off prompt's state arrived whole (the decode side of P/D);
- a snapshot when a request ends with stop or length: its state after prompt + output minus
  the last sampled token (or all of it, when a speculative step fed that token too), exactly
  what a next turn extends. Its MTP entries before that point are written first, as the next
  drafting step would have.
"""

from __future__ import annotations

from baton.workers.engine.prefix_cache import PrefixCache
from baton.workers.engine.request import Phase, Sequence
from baton.workers.engine.runner import ModelRunner


class SnapshotKeeper:
    """The engine's side of the prefix cache (see the module docstring)."""

    def __init__(self, prefix: PrefixCache, runner: ModelRunner, snapshot_interval: int):
        self.prefix = prefix
        self.runner = runner
        self.snapshot_interval = snapshot_interval

    @staticmethod
    def committed(seq: Sequence) -> int:
        """Tokens whose KV (and with MTP, MTP entries) are final in seq's pages."""
        return min(seq.cached_len, seq.mtp_cached) if seq.needs_mtp else seq.cached_len

    def publish(self, seq: Sequence) -> None:
        self.prefix.publish(seq.cache_keys, seq.tokens, seq.pages, self.committed(seq),
                            seq.needs_mtp)

    def snapshot(self, seq: Sequence) -> None:
        """Snapshots seq's committed state at cached_len (its hidden state of the position
        before it is last_hidden)."""
        if seq.last_hidden is None:
            return
        p = seq.cached_len
        mtp = seq.needs_mtp and seq.mtp_cached >= p - 1
        self.prefix.snapshot(seq.cache_keys, seq.tokens, seq.pages, seq.slot, p,
                             seq.last_hidden, mtp)

    def after_step(self, plan, seqs: list[Sequence]) -> None:
        """Publishes newly full pages; snapshots at the chunk ends the docstring names."""
        for seq in seqs:
            if seq.phase == Phase.RUNNING:
                self.publish(seq)
        interval = self.snapshot_interval
        for c in plan.chunks:
            seq, end = c.seq, c.start + c.length
            if c.decode or seq.phase != Phase.RUNNING or seq.cached_len != end:
                continue
            if (end == len(seq.tokens) or (interval and end % interval == 0)
                    or end in seq.request.snapshot_points):
                self.snapshot(seq)

    def prompt_arrived(self, seq: Sequence) -> None:
        """A handed-off prompt's state is whole in seq's pages and slot."""
        self.publish(seq)
        self.snapshot(seq)

    def requests_ended(self, seqs: list[Sequence]) -> None:
        """Requests that finished with stop or length, before their cache is freed. A stop
        inside accepted drafts leaves the slot past the output: no snapshot then."""
        ends = [s for s in seqs if s.cached_len <= len(s.tokens) and s.sink is None]
        self.runner.flush_mtp([s for s in ends if s.needs_mtp])
        for seq in ends:
            self.publish(seq)
            self.snapshot(seq)
