"""Choosing a worker for a request.

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
from collections.abc import Collection

from baton.workers.router.discovery import Worker

ROUTINGS = ("least-loaded", "round-robin")


class Balancer:
    def __init__(self, routing: str) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing = routing
        self._turns = {role: itertools.count() for role in ("prefill", "decode")}

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

    def order(self, workers: list[Worker], avoid: Collection[str] = (),
              need_tokens: int = 0) -> list[Worker]:
        """Ready workers, best candidate first: those that reported too little room for
        need_tokens (decode) and those in `avoid` go last. Reports lag, so nobody is left
        out: a worker that is full after all refuses, and the next one is asked."""
        if not workers:
            return []
        if self.routing == "round-robin":
            ranked = sorted(workers, key=lambda w: w.address)
            shift = next(self._turns[ranked[0].role]) % len(ranked)
            ranked = ranked[shift:] + ranked[:shift]
        else:
            ranked = sorted(workers, key=self._key)
        return sorted(ranked, key=lambda w: (w.address in avoid,
                                             self._lacks_room(w, need_tokens)))
