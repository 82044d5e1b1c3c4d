"""Which ramps a fleet can absorb, and which traces ask for more (declared infeasible).

Replicas added when a ramp begins serve one start-up later; the rise of the load over that
start-up plus the interval until a decision sees it must be served by capacity the fleet
already has. autoscaling.rampPerMinute says how steep a ramp the fleet keeps capacity for
(AutoscalingSpec.ramp_headroom: rampPerMinute x (startupSeconds + intervalSeconds) / 60 of
the load). A trace whose load rises faster than that, within that time, is infeasible for
the spec: the report says so and why, rather than count its misses against the policy.

    verdict = feasibility(spec, {"prefill": prompt_tokens_per_s, "decode": tokens_per_s})

The load is per second and smooth: a generator's expected load, or a measured trace's
smoothed over SMOOTHING_SECONDS (the noise of one draw would read as ramps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baton.operator.autoscaler.oracle import centred_mean, load_per_second

__all__ = ["Feasibility", "SMOOTHING_SECONDS", "feasibility", "steepest_rise", "trace_load"]

SMOOTHING_SECONDS = 300
"""A measured trace's load is averaged over this many seconds before its ramps are read."""


@dataclass(frozen=True)
class Feasibility:
    """Whether a trace's steepest rise stays within what the spec absorbs."""

    feasible: bool
    rise: float
    """The largest rise within `span_s`, as a share of the level it rose from."""
    allowed: float
    """What the spec absorbs over `span_s`: AutoscalingSpec.ramp_headroom()."""
    span_s: float
    at_s: float
    """When the steepest rise began."""
    role: str
    reason: str

    def summary(self) -> dict:
        return {"feasible": self.feasible, "rise": round(self.rise, 4),
                "allowed": round(self.allowed, 4), "span_s": self.span_s,
                "at_s": self.at_s, "role": self.role, "reason": self.reason}


def steepest_rise(load: np.ndarray, span: int) -> tuple[float, int]:
    """(max over t of max(load[t+1 .. t+span]) / load[t] - 1, that t) for a per-second
    load; (0, 0) when it never rises."""
    load = np.asarray(load, dtype=np.float64)
    span = max(1, int(span))
    if load.size < 2:
        return 0.0, 0
    padded = np.concatenate([np.nan_to_num(load[1:], nan=-np.inf), np.full(span, -np.inf)])
    ahead = np.lib.stride_tricks.sliding_window_view(padded, span).max(axis=1)[:load.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.where(load > 0, ahead / load - 1.0, 0.0)  # NaN load: no rise from it
    rise[~np.isfinite(rise)] = 0.0
    t = int(np.argmax(rise))
    return max(0.0, float(rise[t])), t


def trace_load(time_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
               duration: float, gap_seconds: float) -> dict[str, np.ndarray]:
    """A measured trace's per-second load per role, the mean over the SMOOTHING_SECONDS
    centred on each second. The first SMOOTHING_SECONDS are left out (NaN): there the load
    builds from nothing (no request before the trace is in flight), which is no ramp."""
    seconds = max(1, int(np.ceil(duration)))
    prompt, generated = load_per_second(time_s, prompt_tokens, output_tokens, seconds,
                                        gap_seconds)
    out = {}
    for role, load in (("prefill", prompt), ("decode", generated)):
        smooth = centred_mean(load, SMOOTHING_SECONDS)
        smooth[:SMOOTHING_SECONDS] = np.nan
        out[role] = smooth
    return out


def feasibility(spec, loads: dict[str, np.ndarray]) -> Feasibility:
    """Whether the spec absorbs every rise of `loads` (role -> per-second load; NaN seconds
    are not read): the rise within startupSeconds + intervalSeconds may be at most
    AutoscalingSpec.ramp_headroom()."""
    auto = spec.autoscaling
    span = auto.startup_seconds + auto.interval_seconds
    allowed = auto.ramp_headroom()
    worst = None
    for role, load in loads.items():
        rise, at = steepest_rise(load, span)
        if worst is None or rise > worst[0]:
            worst = (rise, at, role)
    rise, at, role = worst if worst is not None else (0.0, 0, "prefill")
    feasible = rise <= allowed + 1e-9
    per_minute = rise * 60 / span
    if feasible:
        reason = (f"steepest rise {rise:.0%} of the {role} load within {span} s (at "
                  f"{at / 60:.0f} min) <= {allowed:.0%} that rampPerMinute "
                  f"{auto.ramp_per_minute:g} absorbs")
    else:
        reason = (f"the {role} load rises {rise:.0%} within {span} s (startupSeconds "
                  f"{auto.startup_seconds} + intervalSeconds {auto.interval_seconds}) at "
                  f"{at / 60:.0f} min, {per_minute:.3g} of the load per minute: steeper than "
                  f"rampPerMinute {auto.ramp_per_minute:g} ({allowed:.0%} over that time)")
    return Feasibility(feasible=feasible, rise=rise, allowed=allowed, span_s=float(span),
                       at_s=float(at), role=role, reason=reason)
