"""The oracle: the GPU hours of a fleet that follows a trace's load exactly.

It knows the whole trace, so it is a lower bound for any autoscaler with the same rules: its
replicas are created `startup` seconds before the load needs them (and cost from then on, as
in the simulator) and leave the scale-down window after the last second that needed them.
"The load" is what the capacity model (baton.operator.autoscaler.capacity) sizes for, at
one-second resolution, averaged over the autoscaler's rate window centred on each second:
- prefill: prompt tokens arriving per second;
- decode: tokens each request generates, spread over its lifetime at the ITL target
  ((output tokens - 1) gaps starting at its arrival).
The replicas per pool then come from the same placement the policy uses (place_role), with
the trace's mean prompt for the prefill capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from baton.operator.autoscaler.capacity import place_role
from baton.operator.autoscaler.profile import ReplicaProfile

__all__ = ["OracleFleet", "centred_mean", "load_per_second", "oracle_fleet"]

ROLES = ("prefill", "decode")
_SUBSTEPS = 10
"""Decode lifetimes are laid out at 0.1 s before they are summed per second."""
_DEMAND_QUANTUM = 10.0
"""Demands are rounded up to this many tokens/s before placement (placement is cached)."""


@dataclass(frozen=True)
class OracleFleet:
    """Replicas per role and pool for every second of the trace, and what they cost."""

    replicas: dict[str, dict[str, np.ndarray]]
    gpu_hours: float
    cost: float

    def peak(self) -> dict[str, dict[str, int]]:
        return {role: {pool: int(n.max()) for pool, n in pools.items()}
                for role, pools in self.replicas.items()}

    def total(self, role: str) -> np.ndarray:
        return sum(self.replicas[role].values())

    def summary(self) -> dict:
        return {"gpu_hours": round(self.gpu_hours, 4), "cost": round(self.cost, 4),
                "peak_fleet": self.peak()}


def centred_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Mean over the `width` seconds centred on each second (fewer at the trace's ends)."""
    width = max(1, int(width))
    cum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo = np.clip(idx - width // 2, 0, len(values))
    hi = np.clip(idx - width // 2 + width, 0, len(values))
    return (cum[hi] - cum[lo]) / np.maximum(hi - lo, 1)


def _sliding_max(values: np.ndarray, behind: int, ahead: int) -> np.ndarray:
    """max(values[t - behind : t + ahead + 1]) for every t (clipped at the ends)."""
    padded = np.concatenate([np.full(behind, -np.inf), values, np.full(ahead, -np.inf)])
    view = np.lib.stride_tricks.sliding_window_view(padded, behind + ahead + 1)
    return view.max(axis=1)


def load_per_second(time_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
                    seconds: int, gap_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens arriving, tokens generated at `gap_seconds` per token) in each second."""
    second = np.clip(np.floor(time_s).astype(np.int64), 0, seconds - 1)
    prompt = np.bincount(second, weights=prompt_tokens.astype(np.float64), minlength=seconds)
    # each request generates 1/gap tokens per second from its arrival for (outputs - 1) gaps
    rate = np.zeros(seconds * _SUBSTEPS + 1)
    start = np.clip(np.rint(time_s * _SUBSTEPS).astype(np.int64), 0, seconds * _SUBSTEPS)
    end = np.clip(np.rint((time_s + (output_tokens - 1) * gap_seconds) * _SUBSTEPS)
                  .astype(np.int64), 0, seconds * _SUBSTEPS)
    np.add.at(rate, start, 1.0 / gap_seconds)
    np.add.at(rate, end, -1.0 / gap_seconds)
    generated = np.cumsum(rate)[:-1].reshape(seconds, _SUBSTEPS).sum(axis=1) / _SUBSTEPS
    return prompt, generated


def oracle_fleet(spec, profile: ReplicaProfile, time_s: np.ndarray, prompt_tokens: np.ndarray,
                 output_tokens: np.ndarray, duration: float, *, startup_seconds: float,
                 rate_window_seconds: float) -> OracleFleet:
    """The oracle's replicas for a trace (arrays as in simulator.Trace) and a Model spec."""
    seconds = max(1, int(math.ceil(duration)))
    window = spec.autoscaling.scale_down_stabilization_seconds
    prompt, generated = load_per_second(time_s, prompt_tokens, output_tokens, seconds,
                                        spec.autoscaling.targets.inter_token_latency_seconds)
    mean_prompt = float(np.mean(prompt_tokens))
    demand = {"prefill": centred_mean(prompt, rate_window_seconds),
              "decode": centred_mean(generated, rate_window_seconds)}
    replicas: dict[str, dict[str, np.ndarray]] = {}
    gpu_seconds = cost_seconds = 0.0
    for role in ROLES:
        # a replica is created `startup` before a second that needs it and kept for the
        # scale-down window after
        need = _sliding_max(demand[role], int(window), int(math.ceil(startup_seconds)))
        pools = spec.role(role).pools
        ceiling = {p.name: p.max_replicas for p in pools}
        placed: dict[float, dict[str, int]] = {}
        per_pool = {p.name: np.zeros(seconds, dtype=np.int64) for p in pools}
        quantized = np.ceil(need / _DEMAND_QUANTUM) * _DEMAND_QUANTUM
        for t, value in enumerate(quantized.tolist()):
            fleet = placed.get(value)
            if fleet is None:
                fleet = placed[value] = place_role(value, spec, role, profile, mean_prompt,
                                                   ceiling)[0]
            for pool, n in fleet.items():
                per_pool[pool][t] = n
        replicas[role] = per_pool
        gpus = spec.role(role).gpus_per_replica
        for pool in pools:
            replica_seconds = float(per_pool[pool.name].sum())
            gpu_seconds += replica_seconds * gpus
            cost_seconds += replica_seconds * pool.cost_per_hour
    return OracleFleet(replicas=replicas, gpu_hours=gpu_seconds / 3600.0,
                       cost=cost_seconds / 3600.0)
