"""What one replica of each pool can take, and the fewest replicas per pool that cover a demand.

Each role's demand is measured in tokens per second: prefill in prompt tokens, decode in
generated tokens (unlike concurrent sequences, a token rate does not grow when a fleet is
consolidated and each sequence runs slower). One replica of a pool supplies a capacity from
the reference profile scaled by the pool's relativeSpeed and held below the latency target:
- prefill: profile tokens/s * relativeSpeed * a utilization cap rho. A request's TTFT is its
  wait plus its own prefill time s (mean prompt / the replica's tokens/s). In an M/M/c queue
  of c replicas the wait's tail is exponential with rate c (1 - rho) / s, so its 95th
  percentile stays within TTFT target - s while 1 - rho >= ln(20) s / (c (target - s));
  rho is at most PREFILL_MAX_UTILIZATION.
- decode: the largest batch B whose step time stays within the ITL target (after a margin for
  admission gaps) at the pool's speed, capped by maxConcurrency and the profile's max batch
  (ReplicaProfile.decode_batch_limit); the replica then emits B * speed / step(B) tokens/s,
  of which DECODE_HEADROOM is planned for.

Placement: every pool starts at minReplicas; the rest of the demand goes to pools in order
of cost per capacity (costPerHour / relativeSpeed), each up to a ceiling (maxReplicas, or
what a pool with Pending pods could schedule). Each role keeps at least one replica: a role
without workers answers 503 and its demand would never show in metrics.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from baton.operator.autoscaler.profile import ReplicaProfile

if TYPE_CHECKING:
    from baton.operator.spec import ModelSpec, PoolSpec

__all__ = ["pool_order", "pool_capacities", "place", "place_role", "PREFILL_MAX_UTILIZATION",
           "PREFILL_MIN_UTILIZATION", "PREFILL_TAIL_FACTOR", "DECODE_HEADROOM",
           "ITL_STEP_MARGIN"]

PREFILL_MAX_UTILIZATION = 0.85
"""Prefill utilization never planned above this, whatever the prompt length."""
PREFILL_MIN_UTILIZATION = 0.2
"""Floor of the TTFT-derived utilization cap (prompts nearly as long as the target)."""
PREFILL_TAIL_FACTOR = 3.0
"""ln 20: the 95th percentile of an exponential wait in units of its mean."""
DECODE_HEADROOM = 0.95
"""Share of a decode replica's tokens/s at its ITL-bounded batch that is planned for."""
ITL_STEP_MARGIN = 0.9
"""Share of the ITL target a decode step may take (admission and transfer gaps take the rest)."""
_EPS = 1e-9


def pool_order(pools: tuple[PoolSpec, ...]) -> list[PoolSpec]:
    """Pools cheapest capacity first: costPerHour / relativeSpeed, then spec order."""
    indexed = list(enumerate(pools))
    indexed.sort(key=lambda ip: (ip[1].cost_per_hour / ip[1].relative_speed, ip[0]))
    return [p for _, p in indexed]


def pool_capacities(spec: ModelSpec, role: str, profile: ReplicaProfile,
                    mean_prompt_tokens: float | None = None,
                    replicas: int = 1) -> dict[str, float]:
    """Capacity one replica of each pool plans for, in the role's demand unit (tokens/s).
    replicas: how many replicas serve the role (the prefill queue's servers)."""
    targets = spec.autoscaling.targets
    capacities: dict[str, float] = {}
    for pool in spec.role(role).pools:
        speed = pool.relative_speed
        if role == "prefill":
            tokens_per_second = profile.prefill_tokens_per_second * speed
            utilization = PREFILL_MAX_UTILIZATION
            if mean_prompt_tokens:
                service = mean_prompt_tokens / tokens_per_second
                slack = targets.time_to_first_token_seconds - service
                if slack <= 0:
                    utilization = PREFILL_MIN_UTILIZATION
                else:
                    utilization = min(utilization, max(
                        PREFILL_MIN_UTILIZATION,
                        1.0 - PREFILL_TAIL_FACTOR * service / (max(1, replicas) * slack)))
            capacities[pool.name] = tokens_per_second * utilization
        else:
            batch = profile.decode_batch_within(
                targets.inter_token_latency_seconds * ITL_STEP_MARGIN, speed,
                spec.decode.max_concurrency)
            tokens_per_second = (batch / profile.decode_step(batch, speed)) if batch else 0.0
            capacities[pool.name] = tokens_per_second * DECODE_HEADROOM
    return capacities


def place(demand: float, pools: list[PoolSpec], capacity: dict[str, float],
          ceiling: dict[str, int]) -> tuple[dict[str, int], bool]:
    """Replicas per pool covering `demand`: minReplicas everywhere, then pools in the given
    order up to `ceiling`. Returns (replicas, limited: demand left uncovered)."""
    replicas = {p.name: min(p.min_replicas, ceiling[p.name]) for p in pools}
    remaining = demand - sum(replicas[p.name] * capacity[p.name] for p in pools)
    for pool in pools:
        if remaining <= _EPS:
            break
        if capacity[pool.name] <= 0:
            continue
        room = ceiling[pool.name] - replicas[pool.name]
        add = min(room, math.ceil(remaining / capacity[pool.name] - _EPS))
        if add > 0:
            replicas[pool.name] += add
            remaining -= add * capacity[pool.name]
    if sum(replicas.values()) == 0:
        for pool in pools:
            if ceiling[pool.name] > 0:
                replicas[pool.name] = 1
                break
    return replicas, remaining > _EPS


def place_role(demand: float, spec: ModelSpec, role: str, profile: ReplicaProfile,
               mean_prompt_tokens: float | None,
               ceiling: dict[str, int]) -> tuple[dict[str, int], bool]:
    """place() for one role with capacities that match the fleet placed: prefill capacity
    grows with the number of replicas sharing the queue, so the replica count is iterated
    from one replica to its fixed point (on a cycle the larger fleet wins). It does not
    depend on the current fleet, so a fleet never shrinks only because it had grown."""
    pools = pool_order(spec.role(role).pools)
    n, tried = 1, {}
    while True:
        capacity = pool_capacities(spec, role, profile, mean_prompt_tokens, n)
        replicas, short = place(demand, pools, capacity, ceiling)
        total = sum(replicas.values())
        if total == n or role == "decode":
            return replicas, short
        if total in tried:
            visited = list(tried)
            cycle = [tried[k] for k in visited[visited.index(total):]] + [(replicas, short)]
            return max(cycle, key=lambda rs: sum(rs[0].values()))
        tried[n] = (replicas, short)
        n = total
