"""The autoscaling policy: a pure function from what was observed to replicas per pool.

    decision = decide(spec, observation, current, pending, state, now, profile)

Each role's demand is measured in tokens per second: prefill in prompt tokens, decode in
generated tokens (unlike concurrent sequences, a token rate does not grow when a fleet is
consolidated and each sequence runs slower). One replica of a pool supplies a capacity from
the reference profile scaled by the pool's relativeSpeed and held below the latency target:
- prefill: profile tokens/s * relativeSpeed * a utilization cap rho. A request's TTFT is its
  wait plus its own prefill time s (mean prompt / the replica's tokens/s). In an M/M/c queue
  of c replicas the wait's tail is exponential with rate c (1 - rho) / s, so its 95th
  percentile stays within TTFT target - s while 1 - rho >= ln(20) s / (c (target - s));
  c is the role's current replica count (at least 1), and rho is at most
  PREFILL_MAX_UTILIZATION. Requests already queued add the rate that clears them within
  one TTFT target.
- decode: the largest batch B whose step time stays within the ITL target (after a margin for
  admission gaps) at the pool's speed, capped by maxConcurrency and the profile's max batch
  (ReplicaProfile.decode_batch_limit); the replica then emits B * speed / step(B) tokens/s,
  of which DECODE_HEADROOM is planned for. Demand is the larger of the generated tokens/s
  and the concurrent sequences (running plus waiting) / ITL target: the tokens/s that gives
  every sequence present its target gap (the token rate saturates when a fleet is full; the
  sequence count does not).
Scale-up anticipates the load at the time new replicas are ready: a token rate rising
clearly (TREND_MIN_RISE) is extrapolated STARTUP_LEAD_SECONDS + intervalSeconds ahead from
its slope over the last TREND_SECONDS. A role whose attainment is below the target gets at
least its current capacity times a boost (the capacity model was wrong for this load), at
most once per BOOST_COOLDOWN_SECONDS, long enough for the replicas of the last boost to show
in metrics.

Placement: every pool starts at minReplicas; the rest of the demand goes to pools in order
of cost per capacity (costPerHour / relativeSpeed), each up to maxReplicas, or up to the
replicas it could schedule when its pods stayed Pending (the pool counts as full until a
stabilization window has passed since Pending pods were last seen). Each role keeps at least
one replica: a role without workers answers 503 and its demand would never show in metrics.

Scale-up is immediate. Scale-down follows the largest demand within the
scaleDownStabilizationSeconds window (the HPA's rule), so no replica is removed inside the
window after the demand that needed it; the trend's forecast is not held (capacity added
ahead of a rise that stops was never needed). Missing metrics hold the last decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from baton.operator.autoscaler.profile import ReplicaProfile

if TYPE_CHECKING:
    from baton.operator.spec import ModelSpec, PoolSpec

__all__ = ["ROLES", "Observation", "PolicyState", "Decision", "decide", "pool_order",
           "pool_capacities", "place", "place_role", "PREFILL_MAX_UTILIZATION", "DECODE_HEADROOM",
           "ITL_STEP_MARGIN", "BOOST_COOLDOWN_SECONDS"]

ROLES = ("prefill", "decode")

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
BOOST_COOLDOWN_SECONDS = 180.0
"""Between attainment boosts of one role: replica start-up (>= 90 s) plus a 60 s rate window."""
BOOST_MIN, BOOST_MAX = 1.15, 1.5
"""Bounds of the capacity factor an attainment breach asks for."""
STARTUP_LEAD_SECONDS = 90.0
"""How far beyond the next decision a rising demand is extrapolated: a replica's start-up."""
TREND_SECONDS = 180.0
"""The span of recent demand the slope is fitted over."""
TREND_MAX_GROWTH = 0.5
"""The trend adds at most this share of the current token rate."""
TREND_MIN_RISE = 0.1
"""A slope counts only when it rises by this share of the token rate per TREND_SECONDS
(below that it is the rate window's noise), and only once half of TREND_SECONDS of
history has been seen."""
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
    recent_demand: tuple[tuple[float, float, float, float, float], ...] = ()
    """(time, measured prefill and decode token rates, needed prefill and decode demand)
    within the stabilization window (needed: with queued work and boost, without trend)."""
    full_pools: dict[str, tuple[float, int]] = field(default_factory=dict)
    """"role/pool" -> (when Pending pods were last seen, replicas the pool could schedule)."""
    observing_since: float | None = None
    """When the policy first saw metrics: before a whole window has been seen, the demand
    that needed the current replicas is unknown, so no pool shrinks (except a full one)."""


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
    """Planned demand per role after stabilization: prompt tokens/s (prefill), generated
    tokens/s (decode)."""
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


def _role_demand(role: str, obs: Observation, spec: ModelSpec,
                 replicas: int) -> tuple[float, float]:
    """(demand, its steady part): the steady part is the token rate alone, which the trend
    is fitted to; the demand adds what queued work needs. The prefill token rate counts
    finished prompts, so it stops growing when prefill is saturated; the queue does not: the
    queue beyond one request per replica (normal at high utilization) asks for the rate
    that clears it before the next decision."""
    targets = spec.autoscaling.targets
    if role == "prefill":
        steady = demand = obs.prompt_tokens_per_second
        excess = obs.prefill_waiting - max(1, replicas)
        if obs.request_rate > 0 and excess > 0:
            mean_prompt = obs.prompt_tokens_per_second / obs.request_rate
            demand += excess * mean_prompt / spec.autoscaling.interval_seconds
        return demand, steady
    sequences = obs.decode_running + obs.decode_waiting
    steady = obs.generation_tokens_per_second
    return max(steady, sequences / targets.inter_token_latency_seconds), steady


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points; 0 with fewer than three."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


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
    capacities = {role: pool_capacities(spec, role, profile, mean_prompt,
                                        sum(current_clamped[role].values()))
                  for role in ROLES}
    attainments = {"prefill": ("ttft", observation.ttft_attainment),
                   "decode": ("itl", observation.itl_attainment)}
    recent = tuple(entry for entry in state.recent_demand if now - entry[0] < window)
    measured: dict[str, float] = {}
    forecast = {role: 0.0 for role in ROLES}
    for index, role in enumerate(ROLES):
        capacity = capacities[role]
        demand, steady = _role_demand(role, observation, spec,
                                      sum(current_clamped[role].values()))
        measured[role] = steady
        trend = [(e[0], e[1 + index]) for e in recent if now - e[0] <= TREND_SECONDS]
        slope = _slope(trend + [(now, steady)])
        enough = bool(trend) and now - trend[0][0] >= TREND_SECONDS / 2
        if enough and slope * TREND_SECONDS > TREND_MIN_RISE * steady:
            # what the load will be when replicas started now are ready, at most
            # TREND_MAX_GROWTH of it (a fitted slope is noisy)
            ahead = min(slope * (STARTUP_LEAD_SECONDS + auto.interval_seconds),
                        TREND_MAX_GROWTH * steady)
            if ahead > 0.01 * demand:
                notes[role].append(f"rising {slope * 60:.3g}/min")
            forecast[role] = ahead
        label, attained = attainments[role]
        if attained is not None and attained < auto.targets.attainment - _EPS:
            notes[role].append(f"{label} attainment {attained:.3f} < "
                               f"{auto.targets.attainment:g}")
            since = now - last_boost.get(role, -math.inf)
            if since >= BOOST_COOLDOWN_SECONDS:
                shortfall = (auto.targets.attainment - attained) / max(
                    1.0 - auto.targets.attainment, 0.01)
                factor = min(BOOST_MAX, max(BOOST_MIN, 1.0 + 0.5 * shortfall))
                have = sum(current_clamped[role][p] * capacity[p] for p in capacity)
                if have * factor > demand:
                    demand = have * factor
                    last_boost[role] = now
                    notes[role].append(f"boosted x{factor:.2f}")
        raw[role] = demand

    recent += ((now, measured["prefill"], measured["decode"], raw["prefill"], raw["decode"]),)
    # the window holds what was needed; the forecast only leads a rise (it is not held)
    stable = {"prefill": max(max(e[3] for e in recent), raw["prefill"] + forecast["prefill"]),
              "decode": max(max(e[4] for e in recent), raw["decode"] + forecast["decode"])}

    observing_since = now if state.observing_since is None else state.observing_since
    desired: dict[str, dict[str, int]] = {}
    limited: list[str] = []
    for role in ROLES:
        pools = pool_order(spec.role(role).pools)
        ceiling = {}
        for pool in pools:
            full = full_pools.get(f"{role}/{pool.name}")
            ceiling[pool.name] = pool.max_replicas if full is None else max(
                pool.min_replicas, min(pool.max_replicas, full[1]))
        desired[role], short = place_role(stable[role], spec, role, profile, mean_prompt,
                                          ceiling)
        if now - observing_since < window:
            held_back = False
            for pool in pools:
                floor = min(current_clamped[role][pool.name], ceiling[pool.name])
                if desired[role][pool.name] < floor:
                    desired[role][pool.name] = floor
                    held_back = True
            if held_back:
                notes[role].append(f"scale-down waits until {window} s of metrics have been "
                                   "seen")
        if short:
            limited.append(role)
            notes[role].append("demand exceeds maxReplicas of every pool")
        for pool in pools:
            if capacities[role][pool.name] <= 0:
                notes[role].append(f"pool {pool.name} cannot meet the ITL target even at "
                                   f"batch 1; it keeps minReplicas only")
        if stable[role] > raw[role] + _EPS and any(
                desired[role][p] > place_role(raw[role], spec, role, profile, mean_prompt,
                                              ceiling)[0][p]
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
                            last_boost=last_boost, recent_demand=recent, full_pools=full_pools,
                            observing_since=observing_since)
    return Decision(desired=desired, reason=reason, drain=_drain(desired, current_clamped),
                    held=False, limited=tuple(limited), demand=stable, state=new_state,
                    changed=changed)


def _drain(desired: dict[str, dict[str, int]],
           current: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {role: {pool: current[role][pool] - n for pool, n in pools.items()
                   if current[role].get(pool, 0) > n}
            for role, pools in desired.items()}


def _describe(role: str, demand: float, replicas: dict[str, int], notes: list[str]) -> str:
    unit = "prompt tokens/s" if role == "prefill" else "generated tokens/s"
    pools = ", ".join(f"{p} {n}" for p, n in replicas.items())
    text = f"{role}: {demand:.4g} {unit} -> {pools}"
    if notes:
        text += " (" + "; ".join(notes) + ")"
    return text
