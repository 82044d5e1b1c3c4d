"""The autoscaling policy: a pure function from what was observed to replicas per pool.

    decision = decide(spec, observation, current, pending, state, now, profile)

Capacity ahead of the load. A replica added now serves only startupSeconds later, so sizing
from latency (or from the tokens the workers finished, which stop growing once they are
saturated) is late by a start-up at every surge. Each role is sized instead from where its
load is going:
- arrivals: requests reaching the router per second (not those finished), times the mean
  prompt for prefill; for decode, the generated tokens/s (or the tokens/s that gives every
  sequence present its target gap, whichever is larger), which follow the same arrivals;
- trend: how fast the arrival rate rises, when it rises clearly above its noise
  (baton.operator.autoscaler.trend.ramp_slope: the steeper of a slope fitted to the last
  decisions' rates and the gap between a short window of two scrapes and the rate window,
  which sees a ramp's onset within one or two intervals); it is projected `lead` =
  startupSeconds + half the rate window ahead (a rate is half a window old; replicas
  started now serve a start-up later), at most TREND_MAX_GROWTH of the arrival rate;
- headroom for the ramp no decision can lead: replicas ordered at a ramp's onset serve a
  start-up later, so the fleet is sized for (1 + spare) times its demand, spare =
  autoscaling.rampPerMinute x (startupSeconds + intervalSeconds) / 60 less RAMP_ABSORBED
  (what the planned utilization takes anyway). A trace with steeper ramps is infeasible
  for the spec (baton.operator.autoscaler.headroom): no fleet of that cost absorbs it;
- queue: prefill requests queued beyond one per replica, plus what the queue's growth adds
  until new replicas are ready, are work to clear by the next decision (a queue means TTFT
  is being spent already; what it asks for holds only for the window).
- latency as a correction: a role whose attainment is below the target although no change
  of its fleet is still starting (startupSeconds + the rate window since the last scale-up)
  gets at least its current capacity times a boost: the capacity model was wrong for this
  load.

Hysteresis. Scale-up is immediate. A demand that was really needed (arrivals, queue, boost)
holds for the scaleDownStabilizationSeconds window (the HPA's rule), so no replica is removed
inside the window after the load that needed it; a projection holds only for `lead`, until
the replicas started for it are ready and the load it foresaw has shown up or not (a
projection held for a whole window would be capacity for a rise that stopped). A flat load
has no trend and the same demand every interval, so it adds nothing; noise within the rate
window's deviation never counts as a rise.

The capacity model and placement across pools live in baton.operator.autoscaler.capacity;
a pool whose pods stayed Pending counts as full until a stabilization window has passed since
they were last seen. Missing metrics hold the last decision.

Every decision says, per role and in words an operator reads, what it changed and why: the
load now, what it will be when new replicas are ready, the queue, attainment, and what keeps
replicas through the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from baton.operator.autoscaler.capacity import (
    DECODE_HEADROOM,
    ITL_STEP_MARGIN,
    PREFILL_MAX_UTILIZATION,
    PREFILL_TAIL_FACTOR,
    place,
    place_role,
    pool_capacities,
    pool_order,
)
from baton.operator.autoscaler.profile import ReplicaProfile
from baton.operator.autoscaler.trend import TREND_INTERVALS, ramp_slope

if TYPE_CHECKING:
    from baton.operator.spec import ModelSpec

__all__ = ["ROLES", "Observation", "Recent", "PolicyState", "Decision", "decide", "lead_seconds",
           "pool_order", "pool_capacities", "place", "place_role", "PREFILL_MAX_UTILIZATION",
           "PREFILL_TAIL_FACTOR", "DECODE_HEADROOM", "ITL_STEP_MARGIN", "TREND_MAX_GROWTH"]

ROLES = ("prefill", "decode")

BOOST_MIN, BOOST_MAX = 1.15, 1.5
"""Bounds of the capacity factor an attainment breach asks for."""
TREND_MAX_GROWTH = 1.0
"""The projection adds at most this share of the arrival rate."""
RAMP_ABSORBED = {"prefill": 0.2, "decode": 0.05}
"""Per role, the share of a rise the planned capacity takes within the targets already:
spare capacity for rampPerMinute is kept only beyond it. Prefill is planned at most at 85 %
utilization and rounded up to whole replicas; on the feasible members of the family (seed
1), 0.15 gave 1.07-1.16x the oracle's GPU hours and 0.2 gave 1.03-1.09x with the same
worst windows. Decode is planned at 95 % of its ITL-bounded batch, and a batch past it
misses the ITL target at once: it takes little."""
_EPS = 1e-9


@dataclass(frozen=True)
class Observation:
    """What the metrics said about one Model over the last rate window (rates per second)."""

    request_rate: float
    """Requests per second that got their first token (TTFT observations per second)."""
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
    arrival_rate: float | None = None
    """Requests per second reaching the router (finished plus the growth of those in
    flight); None when unknown: request_rate stands in."""
    window_seconds: float = 60.0
    """The rate window the rates were measured over."""
    short_arrival_rate: float | None = None
    """Requests per second reaching the router over the last short_window_seconds (a window
    of a few scrapes); None when unknown."""
    short_window_seconds: float = 30.0
    """The short window beside the rate window: the ramp detector compares the two."""

    def __post_init__(self) -> None:
        for name in ("request_rate", "prompt_tokens_per_second",
                     "generation_tokens_per_second", "prefill_waiting", "decode_running",
                     "decode_waiting"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Observation.{name} must be a finite number >= 0, "
                                 f"got {value!r}")
        for name in ("arrival_rate", "short_arrival_rate"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Observation.{name} must be a finite number >= 0 or None, "
                                 f"got {value!r}")
        for name in ("window_seconds", "short_window_seconds"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Observation.{name} must be a finite number > 0, "
                                 f"got {value!r}")
        for name in ("ttft_attainment", "itl_attainment"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"Observation.{name} must be in [0, 1] or None, got {value!r}")

    @property
    def arrivals(self) -> float:
        """Requests per second reaching the router (request_rate when arrivals are unknown)."""
        return self.request_rate if self.arrival_rate is None else self.arrival_rate


@dataclass(frozen=True)
class Recent:
    """One earlier decision's inputs and demands, kept for the trend and the windows."""

    time: float
    arrivals: float
    """Requests per second reaching the router."""
    prefill_waiting: float
    needed: tuple[float, float]
    """Prefill, decode demand the load needed then (arrivals, queue, boost; no projection)."""
    projected: tuple[float, float]
    """Prefill, decode demand projected `lead` seconds ahead then."""

    def as_list(self) -> list[float]:
        return [self.time, self.arrivals, self.prefill_waiting, *self.needed, *self.projected]

    @classmethod
    def from_list(cls, values: list[float]) -> Recent:
        if len(values) != 7:
            raise ValueError(f"a recent entry has 7 numbers, got {len(values)}")
        v = [float(x) for x in values]
        return cls(v[0], v[1], v[2], (v[3], v[4]), (v[5], v[6]))


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (persisted in status.autoscaler)."""

    desired: dict[str, dict[str, int]] | None = None
    """The last decision, role -> pool -> replicas."""
    last_scale_time: float | None = None
    """When a decision last changed replicas (seconds since the epoch)."""
    last_boost: dict[str, float] = field(default_factory=dict)
    """Per role, when an attainment breach last boosted it."""
    last_scale_up: dict[str, float] = field(default_factory=dict)
    """Per role, when a decision last added replicas to it."""
    recent: tuple[Recent, ...] = ()
    """Earlier decisions within the stabilization window plus the trend's longest span,
    oldest first."""
    mean_prompt_tokens: float | None = None
    """The last mean prompt length seen (for queued work while no prompt finishes)."""
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
    """One line for status and Events: what changed, the load, and why."""
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
    explanations: dict[str, str] = field(default_factory=dict)
    """Per role, its part of `reason` (empty when metrics were missing)."""


def lead_seconds(spec: ModelSpec, window_seconds: float) -> float:
    """How far ahead of its rate window a rising load is projected: a measured rate is half
    a window old, and replicas started now serve one start-up later."""
    return spec.autoscaling.startup_seconds + window_seconds / 2


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


@dataclass
class _RolePlan:
    """How one role's demand came about, for the decision and its explanation."""

    now: float = 0.0
    """The load now: prompt tokens/s arriving (prefill), generated tokens/s (decode)."""
    needed: float = 0.0
    projected: float = 0.0
    planned: float = 0.0
    planned_from: str = "now"
    """now | projection | window: which demand set `planned`."""
    window_age: float = 0.0
    """For planned_from == window: how long ago that demand was needed."""
    notes: list[str] = field(default_factory=list)


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

    obs = observation
    window = auto.scale_down_stabilization_seconds
    rate_window = obs.window_seconds
    lead = lead_seconds(spec, rate_window)
    full_pools = {key: seen for key, seen in state.full_pools.items()
                  if now - seen[0] < max(window, auto.interval_seconds)}
    for role in ROLES:
        for pool in spec.role(role).pools:
            stuck = (pending.get(role) or {}).get(pool.name, 0)
            if stuck > 0:
                have = current_clamped[role][pool.name]
                full_pools[f"{role}/{pool.name}"] = (now, max(0, have - stuck))

    # the trend's spans and the level before them; the window; the projections' hold
    keep = max(window, lead) + max(TREND_INTERVALS) * auto.interval_seconds
    history = [e for e in state.recent if 0 <= now - e.time < keep]
    arrivals = obs.arrivals
    mean_prompt = (obs.prompt_tokens_per_second / obs.request_rate if obs.request_rate > 0
                   else state.mean_prompt_tokens)
    slope = ramp_slope([(e.time, e.arrivals) for e in history], now, arrivals,
                       obs.short_arrival_rate, rate_window, obs.short_window_seconds,
                       auto.interval_seconds)
    ahead = min(slope * lead, TREND_MAX_GROWTH * arrivals)  # more requests/s by then

    plans = {role: _RolePlan() for role in ROLES}
    replicas_now = {role: sum(current_clamped[role].values()) for role in ROLES}

    # prefill: prompt tokens arriving, and the queue to clear
    p = plans["prefill"]
    p.now = max(obs.prompt_tokens_per_second, arrivals * (mean_prompt or 0.0))
    p.needed = p.now
    excess = obs.prefill_waiting - max(1, replicas_now["prefill"])
    previous = history[-1] if history else None
    growth = 0.0
    if previous is not None and now > previous.time:
        growth = (obs.prefill_waiting - previous.prefill_waiting) / (now - previous.time)
    backlog = excess + max(0.0, growth) * auto.startup_seconds
    if mean_prompt and backlog > 0:
        p.needed += backlog * mean_prompt / auto.interval_seconds
        p.notes.append(f"{obs.prefill_waiting:.0f} queued" + (
            f", growing {growth * 60:.3g}/min" if growth > 0 else ""))
    p.projected = p.needed + ahead * (mean_prompt or 0.0)

    # decode: generated tokens, or what every sequence present needs at the target gap
    d = plans["decode"]
    sequences = obs.decode_running + obs.decode_waiting
    d.now = max(obs.generation_tokens_per_second,
                sequences / auto.targets.inter_token_latency_seconds)
    d.needed = d.now
    if obs.decode_waiting >= 1:
        d.notes.append(f"{obs.decode_waiting:.0f} sequences waiting for a batch slot")
    per_request = d.now / arrivals if arrivals > _EPS else 0.0
    d.projected = d.needed + ahead * per_request

    # latency as a correction of the capacity model
    last_boost = dict(state.last_boost)
    last_scale_up = dict(state.last_scale_up)
    attainments = {"prefill": ("TTFT", obs.ttft_attainment),
                   "decode": ("ITL", obs.itl_attainment)}
    for role in ROLES:
        plan = plans[role]
        label, attained = attainments[role]
        if attained is None or attained >= auto.targets.attainment - _EPS:
            continue
        plan.notes.append(f"{label} attainment {attained:.3f} < {auto.targets.attainment:g}")
        settle = auto.startup_seconds + rate_window
        since = now - max(last_boost.get(role, -math.inf), last_scale_up.get(role, -math.inf))
        if since < settle:
            continue  # replicas added lately have not shown in the metrics yet
        capacity = pool_capacities(spec, role, profile, mean_prompt, replicas_now[role])
        have = sum(current_clamped[role][pool] * capacity[pool] for pool in capacity)
        shortfall = (auto.targets.attainment - attained) / max(1.0 - auto.targets.attainment,
                                                                0.01)
        factor = min(BOOST_MAX, max(BOOST_MIN, 1.0 + 0.5 * shortfall))
        if have * factor > plan.needed:
            plan.needed = have * factor
            plan.projected = max(plan.projected, plan.needed)
            last_boost[role] = now
            plan.notes.append(f"capacity x{factor:.2f}: the load needs more than its "
                              "measure says")

    entry = Recent(now, arrivals, obs.prefill_waiting,
                   (plans["prefill"].needed, plans["decode"].needed),
                   (plans["prefill"].projected, plans["decode"].projected))
    led: dict[str, float] = {}
    for index, role in enumerate(ROLES):
        plan = plans[role]
        # a projection holds until the replicas started for it are ready ...
        led[role] = max([plan.needed, plan.projected] + [
            e.projected[index] for e in history
            if now - e.time < lead and e.projected[index] > e.needed[index] + _EPS])
        plan.planned = led[role]
        # ... what was needed holds for the whole window
        for e in history:
            if now - e.time < window and e.needed[index] > plan.planned + _EPS:
                plan.planned, plan.window_age = e.needed[index], now - e.time

    observing_since = now if state.observing_since is None else state.observing_since
    spare = {role: 1.0 + max(0.0, auto.ramp_headroom() - RAMP_ABSORBED[role])
             for role in ROLES}
    desired: dict[str, dict[str, int]] = {}
    limited: list[str] = []
    for role in ROLES:
        plan = plans[role]
        pools = pool_order(spec.role(role).pools)
        ceiling = {}
        for pool in pools:
            full = full_pools.get(f"{role}/{pool.name}")
            ceiling[pool.name] = pool.max_replicas if full is None else max(
                pool.min_replicas, min(pool.max_replicas, full[1]))
        headroom = spare[role]
        desired[role], short = place_role(plan.planned * headroom, spec, role, profile,
                                          mean_prompt, ceiling)
        # which demand the replicas are for, in the explanation
        if plan.planned > led[role] + _EPS and place_role(
                led[role] * headroom, spec, role, profile, mean_prompt,
                ceiling)[0] != desired[role]:
            plan.planned_from = "window"
        elif led[role] > plan.needed + _EPS and place_role(
                plan.needed * headroom, spec, role, profile, mean_prompt,
                ceiling)[0] != desired[role]:
            plan.planned_from = "projection"
        if now - observing_since < window:
            held_back = False
            for pool in pools:
                floor = min(current_clamped[role][pool.name], ceiling[pool.name])
                if desired[role][pool.name] < floor:
                    desired[role][pool.name] = floor
                    held_back = True
            if held_back:
                plan.notes.append(f"no scale-down until {window} s of metrics have been seen")
        if short:
            limited.append(role)
            plan.notes.append("demand exceeds maxReplicas of every pool")
        capacity = pool_capacities(spec, role, profile, mean_prompt)
        for pool in pools:
            if capacity[pool.name] <= 0:
                plan.notes.append(f"pool {pool.name} cannot meet the ITL target even at "
                                  f"batch 1; it keeps minReplicas only")
        for key, (_, cap) in sorted(full_pools.items()):
            r, _, name = key.partition("/")
            if r == role:
                plan.notes.append(f"pool {name} is full at {cap} (pods Pending)")
        if any(desired[role][pool] > current_clamped[role][pool] for pool in desired[role]):
            last_scale_up[role] = now

    changed = desired != current_clamped
    explanations = {role: _describe(role, plans[role], desired[role], current_clamped[role],
                                    arrivals, slope, lead, window) for role in ROLES}
    reason = "; ".join(explanations.values())
    new_state = PolicyState(desired=desired,
                            last_scale_time=now if changed else state.last_scale_time,
                            last_boost=last_boost, last_scale_up=last_scale_up,
                            recent=tuple(history) + (entry,),
                            mean_prompt_tokens=mean_prompt, full_pools=full_pools,
                            observing_since=observing_since)
    return Decision(desired=desired, reason=reason, drain=_drain(desired, current_clamped),
                    held=False, limited=tuple(limited),
                    demand={role: plans[role].planned for role in ROLES}, state=new_state,
                    changed=changed, explanations=explanations)


def _drain(desired: dict[str, dict[str, int]],
           current: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {role: {pool: current[role][pool] - n for pool, n in pools.items()
                   if current[role].get(pool, 0) > n}
            for role, pools in desired.items()}


def _amount(value: float) -> str:
    """A token rate as an operator reads it: 152k, 9.8k, 850."""
    if value >= 9999.5:
        return f"{value / 1000:.0f}k"
    if value >= 999.5:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def _describe(role: str, plan: _RolePlan, desired: dict[str, int], current: dict[str, int],
              arrivals: float, slope: float, lead: float, window: int) -> str:
    unit = "prompt tokens/s" if role == "prefill" else "generated tokens/s"
    pools = ", ".join(f"{pool} {current[pool]} -> {n}" if n != current[pool] else f"{pool} {n}"
                      for pool, n in desired.items())
    if plan.planned_from == "projection":
        trend = (f"arrivals {arrivals:.3g}/s rising {slope * 60:.2g}/s per minute" if slope
                 else f"a rise seen within {lead:.0f} s; arrivals {arrivals:.3g}/s")
        why = (f"sized for {_amount(plan.planned)} {unit} expected {lead:.0f} s ahead, when "
               f"replicas started now serve ({trend}; now {_amount(plan.now)})")
    elif plan.planned_from == "window":
        ago = (f"{plan.window_age / 60:.0f} min" if plan.window_age >= 90
               else f"{plan.window_age:.0f} s")
        why = (f"holding for the {window} s stabilization window: {_amount(plan.planned)} "
               f"{unit} were needed {ago} ago, now {_amount(plan.needed)}")
    else:
        why = f"sized for {_amount(plan.planned)} {unit} (arrivals {arrivals:.3g}/s)"
    text = f"{role} {pools}: {why}"
    if plan.notes:
        text += "; " + "; ".join(plan.notes)
    return text
