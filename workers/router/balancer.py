"""Choosing a worker for a request.

prefix-aware (the default): a worker's score is the share of the prompt it is believed to hold
(the deepest point with KV *and* a Mamba snapshot, prefix_index.py) minus its load (requests
over its capacity, 0..1); a session (the request's cache key, OpenAI's prompt_cache_key) also
scores AFFINITY for the worker that last served it, or, if this router has not seen it, for the
worker it hashes to (so that every router sends a new session to the same worker). With no
prefix held anywhere this is least-loaded. The same score picks prefill workers (their own
caches) from their index.
least-loaded: decode workers by load and free cache (workers whose last Load report had no
free slot or too few free KV tokens for the request last, then the fewest requests, then the
least cache in use); prefill workers by load. A worker's load is
the larger of what this router has on it now and what it last reported (other routers'
requests show up only in the report, this router's newest ones only in its own count).
round-robin: ready workers in turn, whatever their load.
Workers the request already failed on go last: a retry runs on other workers when there are.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence

from baton.operator.spec import ROUTINGS
from baton.workers.router.discovery import Worker
from baton.workers.router.prefix_index import PrefixIndex, rendezvous

# A session's worker wins unless another holds much more of the prompt or is much less loaded.
AFFINITY = 0.3
# A worker that reported no capacity yet is taken to hold this many requests at most.
_UNREPORTED_CAPACITY = 8


class Balancer:
    def __init__(self, routing: str, block_size: int = 16, snapshot_interval: int = 0,
                 index_ttl_s: float = 600.0) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing = routing
        self.snapshot_interval = snapshot_interval
        self._turns = {role: itertools.count() for role in ("prefill", "decode")}
        self.indexes: dict[str, PrefixIndex] = {}
        if routing == "prefix-aware":
            self.indexes = {role: PrefixIndex(block_size, ttl_s=index_ttl_s)
                            for role in ("prefill", "decode")}

    @staticmethod
    def _requests(worker: Worker) -> int:
        return max(worker.inflight, worker.load.running + worker.load.waiting)

    @staticmethod
    def _lacks_room(worker: Worker, need_tokens: int) -> bool:
        """Its last report says it cannot take need_tokens more (no slot or too few KV)."""
        load = worker.load
        if worker.role != "decode" or worker.checked_at == 0 or load.role == 0:
            return False  # not reported yet: unknown, not full
        return load.free_slots == 0 or load.free_kv_tokens < need_tokens

    def _key(self, worker: Worker):
        load = worker.load
        if worker.role == "decode":
            return (self._requests(worker), load.kv_cache_usage_ratio,
                    load.ssm_state_slots_usage_ratio, worker.address)
        return (self._requests(worker), worker.address)

    def _load_ratio(self, worker: Worker) -> float:
        requests = self._requests(worker)
        load = worker.load
        capacity = load.running + load.waiting + load.free_slots if load.role else 0
        return min(1.0, requests / max(capacity, requests, _UNREPORTED_CAPACITY, 1))

    def _prefix_ranked(self, workers: list[Worker], prompt: Sequence[int],
                       cache_key: str | None) -> list[Worker]:
        index = self.indexes[workers[0].role]
        held = index.lookup(prompt) if prompt else {}
        affine = None
        if cache_key:
            affine = index.session(cache_key)
            if affine not in {w.address for w in workers}:
                affine = rendezvous(cache_key, [w.address for w in workers])
        n = max(len(prompt), 1)

        def score(w: Worker) -> float:
            return (held.get(w.address, 0) / n + (AFFINITY if w.address == affine else 0.0)
                    - self._load_ratio(w))

        return sorted(workers, key=lambda w: (-score(w), self._key(w)))

    def order(self, workers: list[Worker], avoid: Collection[str] = (),
              need_tokens: int = 0, prompt: Sequence[int] = (),
              cache_key: str | None = None) -> list[Worker]:
        """Ready workers, best candidate first: those that reported too little room for
        need_tokens (decode) and those in `avoid` go last. Reports lag, so nobody is left
        out: a worker that is full after all refuses, and the next one is asked."""
        if not workers:
            return []
        if self.routing == "round-robin":
            ranked = sorted(workers, key=lambda w: w.address)
            shift = next(self._turns[ranked[0].role]) % len(ranked)
            ranked = ranked[shift:] + ranked[:shift]
        elif self.routing == "prefix-aware":
            ranked = self._prefix_ranked(workers, prompt, cache_key)
        else:
            ranked = sorted(workers, key=self._key)
        return sorted(ranked, key=lambda w: (w.address in avoid,
                                             self._lacks_room(w, need_tokens)))

    def deepest_held(self, workers: list[Worker], prompt: Sequence[int],
                     avoid: Collection[str] = ()) -> int | None:
        """The deepest snapshot point of `prompt` that any of `workers` (none in avoid) is
        believed to hold; None where this routing keeps no index (nothing is known)."""
        if not workers:
            return None
        index = self.indexes.get(workers[0].role)
        if index is None:
            return None
        held = index.lookup(prompt) if prompt else {}
        return max((held.get(w.address, 0) for w in workers if w.address not in avoid),
                   default=0)

    # ---- what the router learns (prefix-aware only) --------------------------------------

    def held(self, worker: Worker, prompt: Sequence[int], cached_tokens: int,
             cache_key: str | None = None) -> None:
        """A worker answered how much of a prompt it held (Reserve, Prefill)."""
        index = self.indexes.get(worker.role)
        if index is None:
            return
        index.correct(worker.address, prompt, cached_tokens)
        if cache_key and worker.role == "decode":
            index.bind(cache_key, worker.address)

    def computed(self, worker: Worker, prompt: Sequence[int], start: int,
                 points: Sequence[int] = ()) -> None:
        """A worker computed (or received) the whole prompt from `start`: it now holds a
        snapshot at the prompt's end; if it computed it, one every snapshot interval and at
        each of the request's snapshot points after start too."""
        index = self.indexes.get(worker.role)
        if index is None:
            return
        index.record(worker.address, prompt, [len(prompt), *self._intervals(start, len(prompt)),
                                              *(p for p in points if start < p < len(prompt))])

    def received(self, worker: Worker, prompt: Sequence[int]) -> None:
        """A decode worker took in a transferred prompt: a snapshot at its end."""
        index = self.indexes.get(worker.role)
        if index is not None:
            index.record(worker.address, prompt, [len(prompt)])

    def finished(self, worker: Worker, tokens: Sequence[int]) -> None:
        """A request ended on a decode worker: it holds tokens (prompt + output) but the last
        one (the state a next turn extends)."""
        index = self.indexes.get(worker.role)
        if index is not None and len(tokens) > 1:
            index.record(worker.address, tokens, [len(tokens) - 1])

    def _intervals(self, start: int, end: int) -> Iterable[int]:
        step = self.snapshot_interval
        if not step:
            return ()
        return range((start // step + 1) * step, end, step)
