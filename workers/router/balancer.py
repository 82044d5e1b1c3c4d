"""Choosing a worker for a request.

least-loaded: decode workers by load and free cache (known-full workers last, then the
fewest requests, then the least cache in use); prefill workers by load. A worker's load is
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

    def _key(self, worker: Worker):
        load = worker.load
        if worker.role == "decode":
            known_full = load.free_slots == 0 and worker.checked_at > 0 and load.running > 0
            return (known_full, self._requests(worker), load.kv_cache_usage_ratio,
                    load.ssm_state_slots_usage_ratio, worker.address)
        return (self._requests(worker), worker.address)

    def order(self, workers: list[Worker], avoid: Collection[str] = ()) -> list[Worker]:
        """Ready workers, best candidate first; those in `avoid` after the others."""
        if not workers:
            return []
        if self.routing == "round-robin":
            ranked = sorted(workers, key=lambda w: w.address)
            shift = next(self._turns[ranked[0].role]) % len(ranked)
            ranked = ranked[shift:] + ranked[:shift]
        else:
            ranked = sorted(workers, key=self._key)
        return ([w for w in ranked if w.address not in avoid]
                + [w for w in ranked if w.address in avoid])
