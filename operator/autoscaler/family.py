"""A seeded family of request traces and Models that the autoscaling policy was not tuned on.

    member = family_member(seed=7, index=3)      # one trace, its Model and its expected load
    members = family(40, seed=7)                 # the same members, 0..39

Each member is drawn from its own generator, numpy's default_rng([seed, index]), so member k
is the same whatever the family's size. What a member draws (uniform where no law is named):
- load: a base rate of 5-60 requests/s (log-uniform) times a diurnal cosine (amplitude
  0-0.35 of the base, a period of 1-4 hours: a day compressed) times surges;
- surges: 2-3 per trace, each to 1.5-4x the level before it, a linear ramp up of 1-15
  minutes, a hold of 2-30 minutes and a ramp down of 1-15 minutes; a trace has its own
  character: its ramps up are near a ramp scale (log-uniform 1-15 minutes, each within
  0.7-1.4x of it) and its factors at most a top (1.5-4x), so some traces are gentle
  throughout and others steep; the first surge starts 12-20 minutes in (the autoscaler has
  seen a stabilization window of calm), the gaps between them are irregular (3-25 minutes),
  and 8-15 minutes of calm close the trace;
- prompts: lognormal, median 500-4000 tokens, sigma 0.5-1.0, clipped to 16..16000, plus a
  share of long prompts (16-32k tokens, uniform) that rises with the load: share(t) =
  base share (0.2-1%) x rate(t) / base rate, at most LONG_SHARE_MAX;
- outputs: lognormal, median 80-600 tokens, sigma 0.5-0.9, clipped to 1..8192, with 1-2
  shifts of the median by 0.6-1.7x, each over 5-20 minutes, at random times;
- pools: 2 or 3 per role from three GPU generations (relativeSpeed and costPerHour:
  blackwell 2.0-2.6 at 8-11/h, hopper 1 at 3.5-5/h, ampere 0.45-0.65 at 1.6-2.6/h); the pool
  with the cheapest capacity keeps one replica, the others none; maxReplicas are drawn so
  that the cheapest pool covers 30-80% of the expected peak and the rest overflows;
- autoscaling: startupSeconds 30-300 (log-uniform), intervalSeconds 15, 20 or 30,
  scaleDownStabilizationSeconds 120-600; targets are the spec's defaults (TTFT 2 s, ITL
  50 ms, attainment 0.95); rampPerMinute is the ramp whose rise over one start-up plus one
  interval is FAMILY_RAMP_RISE of the load (what an operator who pays for 10 % of spare
  capacity beyond the planned utilization can absorb): a member whose ramps are steeper is
  infeasible (baton.operator.autoscaler.headroom).

Arrivals are a Poisson process drawn second by second at rate(t + 0.5), uniform within each
second. The member also carries its expected load per second (prompt tokens/s, generated
tokens/s) from the laws above, which says how steep its ramps really are, without the noise
of one draw (FamilyMember.feasibility). The requests are drawn when first used.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from baton.operator.autoscaler.capacity import pool_capacities
from baton.operator.autoscaler.headroom import Feasibility, feasibility
from baton.operator.autoscaler.profile import ReplicaProfile
from baton.operator.autoscaler.simulator import Trace
from baton.operator.spec import Model, ModelSpec

__all__ = ["FAMILY_PROFILE", "FAMILY_RAMP_RISE", "LONG_PROMPT_RANGE", "LONG_SHARE_MAX", "Surge",
           "OutputShift", "TraceShape", "FamilyMember", "family_member", "family"]

FAMILY_PROFILE = ReplicaProfile(
    prefill_tokens_per_second=12000.0,
    decode_step_seconds=((1, 0.0040), (8, 0.0074), (32, 0.0139), (128, 0.0225)),
    max_decode_batch=128,
)
"""The reference replica the family's Models run on: 12k prefill tokens/s, the default
profile's decode steps."""
LONG_PROMPT_RANGE = (16384, 32768)
LONG_SHARE_MAX = 0.04
"""The share of long prompts never exceeds this, whatever the load."""
PROMPT_CLIP = (16, 16000)
OUTPUT_CLIP = (1, 8192)
TARGETS = {"timeToFirstTokenSeconds": "2", "interTokenLatencySeconds": "0.05",
           "attainment": "0.95"}
# name -> (relativeSpeed range, costPerHour range)
GENERATIONS = {"blackwell": ((2.0, 2.6), (8.0, 11.0)), "hopper": ((1.0, 1.0), (3.5, 5.0)),
               "ampere": ((0.45, 0.65), (1.6, 2.6))}
FAMILY_RAMP_RISE = 0.25
"""A member's rampPerMinute absorbs this rise of the load over startupSeconds +
intervalSeconds."""
_PEAK_MARGIN = 1.4
"""The pools together cover this much of the expected peak (some of it for noise)."""


@dataclass(frozen=True)
class Surge:
    """A linear ramp from the level before to `factor` times it, a hold, a ramp back."""

    start_s: float
    factor: float
    ramp_up_s: float
    hold_s: float
    ramp_down_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.ramp_up_s + self.hold_s + self.ramp_down_s

    def multiplier(self, t: np.ndarray) -> np.ndarray:
        into = t - self.start_s
        up = np.clip(into / self.ramp_up_s, 0.0, 1.0)
        down = np.clip((into - self.ramp_up_s - self.hold_s) / self.ramp_down_s, 0.0, 1.0)
        return 1.0 + (self.factor - 1.0) * (up - down)


@dataclass(frozen=True)
class OutputShift:
    """The output median moves by `factor`, linearly over [start_s, start_s + ramp_s]."""

    start_s: float
    ramp_s: float
    factor: float

    def multiplier(self, t: np.ndarray) -> np.ndarray:
        progress = np.clip((t - self.start_s) / self.ramp_s, 0.0, 1.0)
        return 1.0 + (self.factor - 1.0) * progress


@dataclass(frozen=True)
class TraceShape:
    """The laws one member's requests are drawn from."""

    duration_s: int
    base_rate: float
    """Requests/s before surges, the diurnal cosine's mean."""
    diurnal_amplitude: float
    diurnal_period_s: float
    diurnal_phase: float
    surges: tuple[Surge, ...]
    prompt_median: float
    prompt_sigma: float
    long_share: float
    """Share of 16-32k-token prompts at the base rate; it scales with rate / base rate."""
    output_median: float
    output_sigma: float
    output_shifts: tuple[OutputShift, ...]

    def rate(self, t: np.ndarray) -> np.ndarray:
        """Requests per second at times t."""
        t = np.asarray(t, dtype=np.float64)
        level = self.base_rate * (1.0 + self.diurnal_amplitude * np.cos(
            2.0 * math.pi * t / self.diurnal_period_s + self.diurnal_phase))
        for surge in self.surges:
            level = level * surge.multiplier(t)
        return level

    def long_share_at(self, t: np.ndarray) -> np.ndarray:
        return np.minimum(LONG_SHARE_MAX, self.long_share * self.rate(t) / self.base_rate)

    def output_median_at(self, t: np.ndarray) -> np.ndarray:
        median = np.full(np.shape(t), self.output_median, dtype=np.float64)
        for shift in self.output_shifts:
            median = median * shift.multiplier(np.asarray(t, dtype=np.float64))
        return median

    def expected_load(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens/s, generated tokens/s) expected in each second of the trace: the
        load without the noise of one draw. Lognormal means ignore the clipping."""
        t = np.arange(self.duration_s) + 0.5
        rate = self.rate(t)
        share = self.long_share_at(t)
        body = self.prompt_median * math.exp(self.prompt_sigma ** 2 / 2)
        prompt = rate * ((1.0 - share) * body + share * sum(LONG_PROMPT_RANGE) / 2)
        outputs = self.output_median_at(t) * math.exp(self.output_sigma ** 2 / 2)
        return prompt, rate * np.maximum(outputs - 1.0, 0.0)

    def draw(self, rng: np.random.Generator) -> Trace:
        seconds = np.arange(self.duration_s)
        counts = rng.poisson(self.rate(seconds + 0.5))
        times = np.sort(np.repeat(seconds, counts) + rng.random(int(counts.sum())))
        n = len(times)
        prompts = np.clip(np.rint(rng.lognormal(math.log(self.prompt_median),
                                                self.prompt_sigma, n)), *PROMPT_CLIP)
        long = rng.random(n) < self.long_share_at(times)
        prompts[long] = rng.integers(LONG_PROMPT_RANGE[0], LONG_PROMPT_RANGE[1] + 1,
                                     int(long.sum()))
        outputs = np.clip(np.rint(rng.lognormal(np.log(self.output_median_at(times)),
                                                self.output_sigma)), *OUTPUT_CLIP)
        return Trace(np.round(times, 3), prompts.astype(np.int64), outputs.astype(np.int64))


@dataclass(frozen=True)
class FamilyMember:
    """One trace of the family, the Model it runs against, and how it was drawn."""

    seed: int
    index: int
    shape: TraceShape
    model: Model
    draw_state: dict
    """The member's generator state after its Model was drawn: its requests come from it."""

    @functools.cached_property
    def trace(self) -> Trace:
        """The member's requests, drawn on first use (a member's shape and Model are cheap,
        its hundreds of thousands of requests are not)."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self.draw_state
        return self.shape.draw(rng)

    @property
    def name(self) -> str:
        return f"family-{self.seed}-{self.index}"

    def feasibility(self) -> Feasibility:
        """Whether the spec absorbs the member's ramps, read from its expected load."""
        prompt, generated = self.shape.expected_load()
        return feasibility(self.spec, {"prefill": prompt, "decode": generated})

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def describe(self) -> str:
        """One line: load, surges, pools and start-up."""
        s = self.shape
        surges = ", ".join(f"{x.factor:.1f}x over {x.ramp_up_s / 60:.0f} min at "
                           f"{x.start_s / 60:.0f} min" for x in s.surges)
        pools = "; ".join(f"{role} " + ", ".join(
            f"{p.name} {p.relative_speed:g}x {p.min_replicas}-{p.max_replicas}"
            for p in self.spec.role(role).pools) for role in ("prefill", "decode"))
        auto = self.spec.autoscaling
        return (f"{s.duration_s / 60:.0f} min at {s.base_rate:.1f} req/s (diurnal "
                f"+-{s.diurnal_amplitude:.0%}); surges {surges}; {pools}; startup "
                f"{auto.startup_seconds} s, interval {auto.interval_seconds} s, window "
                f"{auto.scale_down_stabilization_seconds} s")


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _shape(rng: np.random.Generator) -> TraceShape:
    surges = []
    t = rng.uniform(12, 20) * 60
    # a trace's own character: how steep its ramps are and how high its surges go
    ramp_scale = _loguniform(rng, 1, 15)
    top = rng.uniform(1.5, 4.0)
    for _ in range(int(rng.integers(2, 4))):
        surge = Surge(start_s=t, factor=rng.uniform(1.5, top),
                      ramp_up_s=float(np.clip(ramp_scale * _loguniform(rng, 0.7, 1.4), 1, 15))
                      * 60, hold_s=rng.uniform(2, 30) * 60,
                      ramp_down_s=rng.uniform(1, 15) * 60)
        surges.append(surge)
        t = surge.end_s + rng.uniform(3, 25) * 60
    duration = int(surges[-1].end_s + rng.uniform(8, 15) * 60)
    shifts = tuple(OutputShift(start_s=rng.uniform(0.1, 0.8) * duration,
                               ramp_s=rng.uniform(5, 20) * 60, factor=rng.uniform(0.6, 1.7))
                   for _ in range(int(rng.integers(1, 3))))
    return TraceShape(
        duration_s=duration, base_rate=_loguniform(rng, 5, 60),
        diurnal_amplitude=rng.uniform(0, 0.35),
        diurnal_period_s=rng.uniform(1, 4) * 3600, diurnal_phase=rng.uniform(0, 2 * math.pi),
        surges=tuple(surges), prompt_median=_loguniform(rng, 500, 4000),
        prompt_sigma=rng.uniform(0.5, 1.0), long_share=rng.uniform(0.002, 0.01),
        output_median=_loguniform(rng, 80, 600), output_sigma=rng.uniform(0.5, 0.9),
        output_shifts=shifts)


def _pools(rng: np.random.Generator) -> list[dict]:
    names = list(GENERATIONS)
    chosen = [names[i] for i in sorted(rng.choice(len(names), int(rng.integers(2, 4)),
                                                  replace=False))]
    pools = []
    for name in chosen:
        (s_lo, s_hi), (c_lo, c_hi) = GENERATIONS[name]
        pools.append({"name": name, "gpuProduct": f"NVIDIA-{name}",
                      "relativeSpeed": f"{rng.uniform(s_lo, s_hi):.2f}",
                      "costPerHour": f"{rng.uniform(c_lo, c_hi):.2f}",
                      "minReplicas": 0, "maxReplicas": 1000})
    return pools


def _resource(name: str, prefill: list[dict], decode: list[dict], auto: dict) -> dict:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": "family"},
            "spec": {"source": {"uri": "pvc://model-store/family"},
                     "prefill": {"pools": prefill},
                     "decode": {"pools": decode, "maxConcurrency": 512},
                     "autoscaling": auto}}


def _size_pools(rng: np.random.Generator, spec: ModelSpec, role: str, pools: list[dict],
                peak: float, mean_prompt: float) -> None:
    """minReplicas 1 on the cheapest capacity, maxReplicas: that pool covers 30-80% of the
    expected peak, the others split the rest (with margin)."""
    capacity = pool_capacities(spec, role, FAMILY_PROFILE, mean_prompt)
    order = sorted(range(len(pools)), key=lambda i: float(pools[i]["costPerHour"])
                   / float(pools[i]["relativeSpeed"]))
    need = _PEAK_MARGIN * peak
    shares = [rng.uniform(0.3, 0.8)]
    for _ in order[1:-1]:
        shares.append(rng.uniform(0.1, 1.0 - sum(shares)))
    for k, i in enumerate(order):
        cap = capacity[pools[i]["name"]]
        share = shares[k] if k < len(order) - 1 else 1.0 - sum(shares) + 0.2
        pools[i]["maxReplicas"] = max(1, math.ceil(share * need / cap))
    pools[order[0]]["minReplicas"] = 1


def family_member(seed: int, index: int) -> FamilyMember:
    """Member `index` of the family drawn from `seed` (see the module docstring)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    shape = _shape(rng)
    prefill, decode = _pools(rng), _pools(rng)
    interval = int(rng.choice([15, 20, 30]))
    window = int(rng.integers(120, 601))
    startup = int(round(_loguniform(rng, 30, 300)))
    auto = {"enabled": True, "prometheusUrl": "http://prometheus:9090",
            "intervalSeconds": interval, "scaleDownStabilizationSeconds": window,
            "startupSeconds": startup, "targets": dict(TARGETS),
            "rampPerMinute": f"{FAMILY_RAMP_RISE * 60 / (startup + interval):.4f}"}
    name = f"family-{index}"
    draft = Model.from_resource(_resource(name, prefill, decode, auto)).spec
    prompt_load, decode_load = shape.expected_load()
    rate = shape.rate(np.arange(shape.duration_s) + 0.5)
    mean_prompt = float(prompt_load.sum() / rate.sum())
    _size_pools(rng, draft, "prefill", prefill, float(prompt_load.max()), mean_prompt)
    _size_pools(rng, draft, "decode", decode, float(decode_load.max()), mean_prompt)
    model = Model.from_resource(_resource(name, prefill, decode, auto))
    return FamilyMember(seed=int(seed), index=int(index), shape=shape, model=model,
                        draw_state=rng.bit_generator.state)


def family(n: int, seed: int) -> list[FamilyMember]:
    """Members 0..n-1 of the family drawn from `seed`."""
    if n < 1:
        raise ValueError(f"a family needs at least one member, got n={n}")
    return [family_member(seed, i) for i in range(n)]
