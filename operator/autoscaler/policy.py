"""The autoscaling policy: a pure function from what was observed to replicas per pool.

    decision = decide(spec, observation, current, pending, state, now, profile)

Each role's demand is measured in its own unit: prefill in prompt tokens per second, decode
in concurrent sequences. One replica of a pool supplies a capacity in that unit from the
reference profile scaled by the pool's relativeSpeed and held below the latency target:
- prefill: profile tokens/s * relativeSpeed * a utilization cap. A request's TTFT is its wait
  plus its own prefill time s; with queueing waits roughly exponential, the 95th percentile
  wait is ~3x the mean wait, so utilization is held at 1 - 3 s / TTFT target (at most 0.8).
  Requests already queued add the rate that clears them within one TTFT target.
- decode: the largest batch whose step time stays within the ITL target (after a margin for
  admission and transfer gaps) at the pool's speed, capped by maxConcurrency and the profile's
  max batch, times a headroom for load that arrives while new replicas start. Demand is the
  larger of the sequences running plus waiting and generated tokens/s times the mean gap
  (Little's law; smoother than the gauges).
A role whose attainment is below the target gets at least its current capacity times a boost
(the capacity model was wrong for this load) once per BOOST_COOLDOWN_SECONDS, long enough
for replicas started by the last boost to count in the metrics.

Placement: every pool starts at minReplicas; the rest of the demand goes to pools in order
of cost per capacity (costPerHour / relativeSpeed), each up to maxReplicas, or up to the
replicas it could schedule when its pods stayed Pending (the pool counts as full until a
stabilization window has passed since Pending pods were last seen). Each role keeps at least
one replica: a role without workers answers 503 and its demand would never show in metrics.

Scale-up is immediate. Scale-down follows the largest demand seen within the
scaleDownStabilizationSeconds window (the HPA's rule), so no replica is removed inside the
window after the demand that needed it. Missing metrics hold the last decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from baton.operator.autoscaler.profile import ReplicaProfile

if TYPE_CHECKING:
    from baton.operator.spec import ModelSpec, PoolSpec

__all__ = ["ROLES", "Observation", "PolicyState", "Decision", "decide", "pool_order",
           "pool_capacities", "place", "PREFILL_MAX_UTILIZATION", "DECODE_HEADROOM",
           "ITL_STEP_MARGIN", "BOOST_COOLDOWN_SECONDS"]

ROLES = ("prefill", "decode")

PREFILL_MAX_UTILIZATION = 0.8
"""Prefill utilization never planned above this, whatever the prompt length."""
PREFILL_MIN_UTILIZATION = 0.2
"""Floor of the TTFT-derived utilization cap (prompts nearly as long as the target)."""
PREFILL_TAIL_FACTOR = 3.0
"""95th-percentile wait / mean wait for exponential waits (ln 20 ~ 3)."""
DECODE_HEADROOM = 0.85
"""Share of a decode replica's ITL-bounded batch that is planned for."""
ITL_STEP_MARGIN = 0.9
"""Share of the ITL target a decode step may take (admission and transfer gaps take the rest)."""
BOOST_COOLDOWN_SECONDS = 180.0
"""Between attainment boosts of one role: replica start-up (>= 90 s) plus a 60 s rate window."""
BOOST_MIN, BOOST_MAX = 1.25, 2.0
"""Bounds of the capacity factor an attainment breach asks for."""
_EPS = 1e-9


@dataclass(frozen=True)
class Observation:
    """What the metrics said about one Model over the last rate window (rates per second)."""

    request_rate: float
    """Requests per second reaching the router (TTFT observations per second)."""
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    prefill_waiting: float
    """Requests queued for prefill (router queue plus prefill workers' queues)."""
    decode_running: float
    decode_waiting: float
    ttft_attainment: float | None
    """Share of requests whose TTFT met the target; None when no request finished prefill."""
    itl_attainment: float | None
    """Share of requests whose mean gap between tokens met the target; None without data."""
    mean_itl_seconds: float | None = None
    """Mean gap between output tokens over the window; None without data."""

    def __post_init__(self) -> None:
        for name in ("request_rate", "prompt_tokens_per_second",
                     "generation_tokens_per_second", "prefill_waiting", "decode_running",
                     "decode_waiting"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Observation.{name} must be a finite number >= 0, "
                                 f"got {value!r}")
        for name in ("ttft_attainment", "itl_attainment"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"Observation.{name} must be in [0, 1] or None, got {value!r}")


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (persisted in status.autoscaler)."""

    desired: dict[str, dict[str, int]] | None = None
    """The last decision, role -> pool -> replicas."""
    last_scale_time: float | None = None
    """When a decision last changed replicas (seconds since the epoch)."""
    last_boost: dict[str, float] = field(default_factory=dict)
    """Per role, when an attainment breach last boosted it."""
    recent_demand: tuple[tuple[float, float, float], ...] = ()
    """(time, prefill demand, decode demand) within the stabilization window."""
    full_pools: dict[str, tuple[float, int]] = field(default_factory=dict)
    """"role/pool" -> (when Pending pods were last seen, replicas the pool could schedule)."""


@dataclass(frozen=True)
class Decision:
    """One run of the policy."""

    desired: dict[str, dict[str, int]]
    """Replicas per role and pool; the reconcile applies them."""
    reason: str
    """One line for status and Events: what was measured and what it needs."""
    drain: dict[str, dict[str, int]]
    """Replicas to remove per role and pool (pools that shrink)."""
    held: bool
    """True when metrics were missing and the last decision was kept."""
    limited: tuple[str, ...]
    """Roles whose demand exceeds every pool's maxReplicas (or schedulable replicas)."""
    demand: dict[str, float]
    """Demand per role after stabilization: prompt tokens/s (prefill), sequences (decode)."""
    state: PolicyState
    """What to remember for the next decision."""

    changed: bool
    """True when desired differs from the replicas the pools have now."""


def pool_order(pools: tuple[PoolSpec, ...]) -> list[PoolSpec]:
    """Pools cheapest capacity first: costPerHour / relativeSpeed, then spec order."""
    indexed = list(enumerate(pools))
    indexed.sort(key=lambda ip: (ip[1].cost_per_hour / ip[1].relative_speed, ip[0]))
    return [p for _, p in indexed]


def pool_capacities(spec: ModelSpec, role: str, profile: ReplicaProfile,
                    mean_prompt_tokens: float | None = None) -> dict[str, float]:
    """Capacity one replica of each pool plans for, in the role's demand unit."""
    targets = spec.autoscaling.targets
    capacities: dict[str, float] = {}
    for pool in spec.role(role).pools:
        speed = pool.relative_speed
        if role == "prefill":
            tokens_per_second = profile.prefill_tokens_per_second * speed
            utilization = PREFILL_MAX_UTILIZATION
            if mean_prompt_tokens:
                service = mean_prompt_tokens / tokens_per_second
                utilization = min(utilization, max(
                    PREFILL_MIN_UTILIZATION,
                    1.0 - PREFILL_TAIL_FACTOR * service / targets.time_to_first_token_seconds))
            capacities[pool.name] = tokens_per_second * utilization
        else:
            batch = profile.decode_batch_within(
                targets.inter_token_latency_seconds * ITL_STEP_MARGIN, speed,
                spec.decode.max_concurrency)
            capacities[pool.name] = batch * DECODE_HEADROOM
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


def _role_demand(role: str, obs: Observation, spec: ModelSpec) -> float:
    targets = spec.autoscaling.targets
    if role == "prefill":
        demand = obs.prompt_tokens_per_second
        if obs.request_rate > 0 and obs.prefill_waiting > 0:
            mean_prompt = obs.prompt_tokens_per_second / obs.request_rate
            demand += obs.prefill_waiting * mean_prompt / targets.time_to_first_token_seconds
        return demand
    demand = obs.decode_running + obs.decode_waiting
    if obs.mean_itl_seconds is not None:
        demand = max(demand, obs.generation_tokens_per_second * obs.mean_itl_seconds)
    return demand


def _clamp_to_spec(spec: ModelSpec, replicas: dict[str, dict[str, int]] | None,
                   fallback: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for role in ROLES:
        out[role] = {}
        for pool in spec.role(role).pools:
            n = (replicas or {}).get(role, {}).get(pool.name)
            if n is None:
                n = fallback.get(role, {}).get(pool.name, pool.min_replicas)
            out[role][pool.name] = max(pool.min_replicas, min(pool.max_replicas, int(n)))
    return out


def decide(spec: ModelSpec, observation: Observation | None,
           current: dict[str, dict[str, int]], pending: dict[str, dict[str, int]],
           state: PolicyState, now: float, profile: ReplicaProfile,
           missing: str = "") -> Decision:
    """Desired replicas per (role, pool) for one Model.

    spec: the Model's typed spec. observation: the metrics, or None when they could not be
    read (`missing` says why). current: replicas each pool's Deployment has now. pending:
    pods per pool Pending for longer than pendingTimeoutSeconds. state: what the last
    decision remembered. now: seconds since the epoch.
    """
    auto = spec.autoscaling
    current_clamped = _clamp_to_spec(spec, current, {})
    if observation is None:
        held = _clamp_to_spec(spec, state.desired, current_clamped)
        why = missing or "no metrics"
        return Decision(desired=held, reason=f"metrics unavailable ({why}): holding the last "
                        "decision", drain=_drain(held, current_clamped), held=True,
                        limited=(), demand={}, state=replace(state, desired=held),
                        changed=held != current_clamped)

    window = auto.scale_down_stabilization_seconds
    full_pools = {key: seen for key, seen in state.full_pools.items()
                  if now - seen[0] < max(window, auto.interval_seconds)}
    for role in ROLES:
        for pool in spec.role(role).pools:
            stuck = (pending.get(role) or {}).get(pool.name, 0)
            if stuck > 0:
                have = current_clamped[role][pool.name]
                full_pools[f"{role}/{pool.name}"] = (now, max(0, have - stuck))

    mean_prompt = (observation.prompt_tokens_per_second / observation.request_rate
                   if observation.request_rate > 0 else None)
    raw: dict[str, float] = {}
    notes: dict[str, list[str]] = {role: [] for role in ROLES}
    last_boost = dict(state.last_boost)
    capacities = {role: pool_capacities(spec, role, profile, mean_prompt) for role in ROLES}
    attainments = {"prefill": ("ttft", observation.ttft_attainment),
                   "decode": ("itl", observation.itl_attainment)}
    for role in ROLES:
        capacity = capacities[role]
        demand = _role_demand(role, observation, spec)
        label, attained = attainments[role]
        if attained is not None and attained < auto.targets.attainment - _EPS:
            notes[role].append(f"{label} attainment {attained:.3f} < "
                               f"{auto.targets.attainment:g}")
            since = now - last_boost.get(role, -math.inf)
            if since >= BOOST_COOLDOWN_SECONDS:
                shortfall = (auto.targets.attainment - attained) / max(
                    1.0 - auto.targets.attainment, 0.01)
                factor = min(BOOST_MAX, max(BOOST_MIN, 1.0 + shortfall))
                have = sum(current_clamped[role][p] * capacity[p] for p in capacity)
                if have * factor > demand:
                    demand = have * factor
                    last_boost[role] = now
                    notes[role].append(f"boosted x{factor:.2f}")
        raw[role] = demand

    recent = tuple(entry for entry in state.recent_demand if now - entry[0] < window)
    recent += ((now, raw["prefill"], raw["decode"]),)
    stable = {"prefill": max(e[1] for e in recent), "decode": max(e[2] for e in recent)}

    desired: dict[str, dict[str, int]] = {}
    limited: list[str] = []
    for role in ROLES:
        pools = pool_order(spec.role(role).pools)
        ceiling = {}
        for pool in pools:
            full = full_pools.get(f"{role}/{pool.name}")
            ceiling[pool.name] = pool.max_replicas if full is None else max(
                pool.min_replicas, min(pool.max_replicas, full[1]))
        desired[role], short = place(stable[role], pools, capacities[role], ceiling)
        if short:
            limited.append(role)
            notes[role].append("demand exceeds maxReplicas of every pool")
        if stable[role] > raw[role] + _EPS and any(
                desired[role][p] > _fit(raw[role], pools, capacities[role], ceiling)[p]
                for p in desired[role]):
            notes[role].append(f"scale-down waits for the {window} s stabilization window")
        for key, (_, cap) in full_pools.items():
            r, _, p = key.partition("/")
            if r == role:
                notes[role].append(f"pool {p} is full at {cap} (pods Pending)")

    changed = desired != current_clamped
    reason = "; ".join(_describe(role, stable[role], desired[role], notes[role])
                       for role in ROLES)
    new_state = PolicyState(desired=desired,
                            last_scale_time=now if changed else state.last_scale_time,
                            last_boost=last_boost, recent_demand=recent, full_pools=full_pools)
    return Decision(desired=desired, reason=reason, drain=_drain(desired, current_clamped),
                    held=False, limited=tuple(limited), demand=stable, state=new_state,
                    changed=changed)


def _fit(demand: float, pools: list[PoolSpec], capacity: dict[str, float],
         ceiling: dict[str, int]) -> dict[str, int]:
    return place(demand, pools, capacity, ceiling)[0]


def _drain(desired: dict[str, dict[str, int]],
           current: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {role: {pool: current[role][pool] - n for pool, n in pools.items()
                   if current[role].get(pool, 0) > n}
            for role, pools in desired.items()}


def _describe(role: str, demand: float, replicas: dict[str, int], notes: list[str]) -> str:
    unit = "prompt tokens/s" if role == "prefill" else "sequences"
    pools = ", ".join(f"{p} {n}" for p, n in replicas.items())
    text = f"{role}: {demand:.4g} {unit} -> {pools}"
    if notes:
        text += " (" + "; ".join(notes) + ")"
    return text
