"""Discrete-event replay of a request trace through the pools and the autoscaling policy.

One request's life: it arrives at the router, which hands it to the prefill replica that
finishes it first (a replica still starting counts from when it is ready; a router queue in
front of FIFO workers behaves the same); prefill takes prompt_tokens / (profile tokens/s *
relativeSpeed) and yields the first token (the state transfer is not modelled). The request
then joins the least-loaded decode replica's continuous batch, or its queue when the batch
is at the replica's limit (ReplicaProfile.decode_batch_limit). A batch of b sequences emits
one token per sequence every decode_step(b) / relativeSpeed seconds; between events b is
constant, so each replica keeps a virtual token clock (tokens per sequence so far) and a heap
of the clock values at which its sequences finish: one heap entry per event, not per token.

A request meets the TTFT target when first token - arrival <= the target, and the ITL target
when its mean gap between output tokens, (finish - first token) / (output_tokens - 1), is
within it (a one-token answer has no gap and meets it).

Fleets: a static run keeps fixed replicas, ready from t = 0. An autoscaled run calls the
policy every intervalSeconds with what Prometheus would have shown over the last rate
window; new replicas become ready `startup_seconds` later (and cost GPU time from the
decision on), removed ones stop taking work and leave when their in-flight work is done.
GPU hours and cost count each replica from its creation until it leaves, over the trace's
duration, times gpusPerReplica.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from baton.operator.autoscaler.oracle import OracleFleet, oracle_fleet
from baton.operator.autoscaler.policy import (
    ROLES,
    Observation,
    PolicyState,
    decide,
    place_role,
    pool_order,
)
from baton.operator.autoscaler.profile import ReplicaProfile
from baton.operator.autoscaler.windows import window_attainment, worst
from baton.operator.spec import ModelSpec

__all__ = ["Trace", "RunResult", "Simulator", "MIN_STARTUP_SECONDS", "RATE_WINDOW_SECONDS",
           "SHORT_WINDOW_SECONDS"]

MIN_STARTUP_SECONDS = 30.0
"""Replica start-up (scheduling, image, weights to GPU) is never modelled shorter than this."""
RATE_WINDOW_SECONDS = 60.0
"""The rate() window the autoscaler's queries use."""
SHORT_WINDOW_SECONDS = 30.0
"""The short window of arrivals beside it: two scrapes at a 15 s scrape interval (the daemon
with BATON_AUTOSCALER_MIN_RATE_WINDOW_SECONDS=30)."""

_READY, _DECODE_ARRIVAL, _DECODE_STEP = 0, 1, 2


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival: CSV columns time_s, prompt_tokens, output_tokens."""

    time_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.time_s)
        if n == 0:
            raise ValueError("a trace needs at least one request")
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("time_s, prompt_tokens and output_tokens must have equal lengths")
        if not np.all(np.isfinite(self.time_s)) or self.time_s.min() < 0:
            raise ValueError("time_s must be finite and >= 0")
        if np.any(np.diff(self.time_s) < 0):
            raise ValueError("time_s must not decrease (requests sorted by arrival)")
        if self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1:
            raise ValueError("prompt_tokens and output_tokens must be >= 1")

    @property
    def duration(self) -> float:
        return float(math.ceil(self.time_s[-1]))

    @classmethod
    def load_csv(cls, path: str | Path) -> Trace:
        times, prompts, outputs = [], [], []
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != ["time_s", "prompt_tokens",
                                                                 "output_tokens"]:
                raise ValueError(f"trace {path}: the header must be time_s,prompt_tokens,"
                                 f"output_tokens, got {header}")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    t, p, o = float(row[0]), int(row[1]), int(row[2])
                except (ValueError, IndexError):
                    raise ValueError(f"trace {path} line {line}: expected a number and two "
                                     f"integers, got {row}") from None
                times.append(t)
                prompts.append(p)
                outputs.append(o)
        try:
            return cls(np.asarray(times, dtype=np.float64), np.asarray(prompts, dtype=np.int64),
                       np.asarray(outputs, dtype=np.int64))
        except ValueError as e:
            raise ValueError(f"trace {path}: {e}") from None


@dataclass
class RunResult:
    """What one simulated run gives."""

    ttft_slo_attainment: float
    itl_slo_attainment: float
    gpu_hours: float
    cost: float
    ttft: np.ndarray
    """Per request, seconds (NaN where prefill was not simulated)."""
    mean_gap: np.ndarray
    """Per request, mean seconds between output tokens (NaN where decode was not simulated)."""
    first_token: np.ndarray
    """Per request, when the first token came out."""
    timeline: dict[str, list] = field(default_factory=dict)
    """Per policy tick: time, load, replicas per role/pool, windowed latency."""
    decisions: int = 0
    scale_events: int = 0
    windows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """"ttft" / "itl" -> (window ends, attainment of the requests arriving in the 5 minutes
    before each end): baton.operator.autoscaler.windows."""

    @property
    def worst_window_ttft_attainment(self) -> float:
        return worst(self.windows["ttft"][1]) if "ttft" in self.windows else math.nan

    @property
    def worst_window_itl_attainment(self) -> float:
        return worst(self.windows["itl"][1]) if "itl" in self.windows else math.nan

    def summary(self) -> dict:
        def r(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 5)
        return {"ttft_slo_attainment": r(self.ttft_slo_attainment),
                "itl_slo_attainment": r(self.itl_slo_attainment),
                "worst_window_ttft_attainment": r(self.worst_window_ttft_attainment),
                "worst_window_itl_attainment": r(self.worst_window_itl_attainment),
                "gpu_hours": round(self.gpu_hours, 4), "cost": round(self.cost, 4)}


class _Replica:
    __slots__ = ("role", "pool", "speed", "cost", "gpus", "created", "ready_at", "gone_at",
                 "draining", "free_at", "limit", "rate", "clock", "last_t", "active",
                 "waiting", "version", "tokens")

    def __init__(self, role: str, pool: str, speed: float, cost: float, gpus: int,
                 created: float, ready_at: float) -> None:
        self.role, self.pool, self.speed, self.cost, self.gpus = role, pool, speed, cost, gpus
        self.created, self.ready_at = created, ready_at
        self.gone_at: float | None = None
        self.draining = False
        self.free_at = 0.0            # prefill: when its queue empties
        self.limit = 0                # decode: most sequences in the batch
        self.rate: list[float] = []   # decode: tokens/s per sequence at batch b
        self.clock = 0.0              # decode: tokens each running sequence has had
        self.last_t = 0.0
        self.active: list[tuple[float, int]] = []   # (clock value at finish, request)
        self.waiting: deque[int] = deque()
        self.version = 0
        self.tokens = 0.0             # decode: tokens generated so far

    def advance(self, t: float) -> None:
        b = len(self.active)
        if b and t > self.last_t:
            step = (t - self.last_t) * self.rate[b]
            self.clock += step
            self.tokens += step * b
        self.last_t = max(self.last_t, t)


class Simulator:
    """Runs fleets over one trace for one Model spec and replica profile."""

    def __init__(self, spec: ModelSpec, profile: ReplicaProfile, trace: Trace, *,
                 startup_seconds: float = MIN_STARTUP_SECONDS,
                 rate_window_seconds: float = RATE_WINDOW_SECONDS) -> None:
        if not startup_seconds >= MIN_STARTUP_SECONDS:
            raise ValueError(f"startup_seconds must be >= {MIN_STARTUP_SECONDS:g} (loading and "
                             f"scheduling a replica), got {startup_seconds!r}")
        if not rate_window_seconds > 0:
            raise ValueError(f"rate_window_seconds must be > 0, got {rate_window_seconds!r}")
        self.spec, self.profile, self.trace = spec, profile, trace
        self.startup = float(startup_seconds)
        self.window = float(rate_window_seconds)
        targets = spec.autoscaling.targets
        self.ttft_target = targets.time_to_first_token_seconds
        self.itl_target = targets.inter_token_latency_seconds
        self.attainment_target = targets.attainment
        self._rates: dict[tuple[float, int], list[float]] = {}

    def pool(self, role: str, name: str):
        for pool in self.spec.role(role).pools:
            if pool.name == name:
                return pool
        raise ValueError(f"role {role} has no pool {name!r}")

    def new_replica(self, role: str, pool_name: str, created: float,
                    ready_at: float) -> _Replica:
        pool = self.pool(role, pool_name)
        rep = _Replica(role, pool_name, pool.relative_speed, pool.cost_per_hour,
                       self.spec.role(role).gpus_per_replica, created, ready_at)
        if role == "decode":
            rep.limit = self.profile.decode_batch_limit(pool.relative_speed,
                                                        self.spec.decode.max_concurrency)
            key = (pool.relative_speed, rep.limit)
            if key not in self._rates:
                self._rates[key] = [0.0] + [pool.relative_speed / self.profile.decode_step(b)
                                            for b in range(1, rep.limit + 1)]
            rep.rate = self._rates[key]
            rep.last_t = ready_at
        return rep

    def static_candidates(self, role: str) -> list[dict[str, int]]:
        """Fixed fleets for one role, smallest first: minReplicas (at least one replica),
        then one replica at a time to the pool with the cheapest capacity that has room."""
        pools = pool_order(self.spec.role(role).pools)
        fleet = {p.name: p.min_replicas for p in pools}
        if sum(fleet.values()) == 0:
            fleet[next(p.name for p in pools if p.max_replicas > 0)] = 1
        out = [dict(fleet)]
        for pool in pools:
            while fleet[pool.name] < pool.max_replicas:
                fleet[pool.name] += 1
                out.append(dict(fleet))
        return out

    def initial_fleet(self) -> dict[str, dict[str, int]]:
        """The fleet the policy places for the first rate window's load, as if the autoscaler
        had been running before the trace began."""
        t = self.trace
        first = t.time_s <= t.time_s[0] + self.window
        span = max(self.window, 1.0)
        mean_prompt = float(t.prompt_tokens[first].mean())
        prompt_rate = float(t.prompt_tokens[first].sum()) / span
        generation_rate = float(t.output_tokens[first].sum()) / span
        demand = {"prefill": prompt_rate, "decode": generation_rate}
        fleet = {}
        for role in ROLES:
            ceiling = {p.name: p.max_replicas for p in self.spec.role(role).pools}
            fleet[role], _ = place_role(demand[role], self.spec, role, self.profile,
                                        mean_prompt, ceiling)
        return fleet

    def run(self, fleet: dict[str, dict[str, int]], *, autoscale: bool,
            roles: tuple[str, ...] = ROLES, first_token: np.ndarray | None = None,
            ) -> RunResult:
        """Replays the trace. fleet: replicas per role and pool at t = 0 (ready). autoscale:
        call the policy every intervalSeconds. roles: simulate only these; decode alone needs
        `first_token`, the first-token times of a prefill run."""
        return _Run(self, fleet, autoscale, roles, first_token).run()

    def oracle(self) -> OracleFleet:
        """The fleet that follows this trace's load exactly, with this start-up time and the
        spec's scale-down window (baton.operator.autoscaler.oracle): a lower bound."""
        t = self.trace
        return oracle_fleet(self.spec, self.profile, t.time_s, t.prompt_tokens,
                            t.output_tokens, t.duration, startup_seconds=self.startup,
                            rate_window_seconds=self.window)

    def search_static(self) -> tuple[dict[str, dict[str, int]], RunResult, bool]:
        """The smallest fixed fleet meeting both attainment targets: bisection over each
        role's candidate fleets (prefill first, alone; then decode on that prefill's
        first-token times). Returns (fleet, its run, whether it meets the targets)."""
        target = self.attainment_target

        def smallest(candidates, meets) -> tuple[int, bool]:
            lo, hi = 0, len(candidates) - 1
            if not meets(candidates[hi]):
                return hi, False
            while lo < hi:
                mid = (lo + hi) // 2
                if meets(candidates[mid]):
                    hi = mid
                else:
                    lo = mid + 1
            return lo, True

        prefill_runs: dict[int, RunResult] = {}

        def prefill_meets(fleet) -> bool:
            run = self.run({"prefill": fleet}, autoscale=False, roles=("prefill",))
            prefill_runs[id(fleet)] = run
            return run.ttft_slo_attainment >= target

        prefill_candidates = self.static_candidates("prefill")
        k, ok_prefill = smallest(prefill_candidates, prefill_meets)
        prefill = prefill_candidates[k]
        first_token = prefill_runs[id(prefill)].first_token

        def decode_meets(fleet) -> bool:
            run = self.run({"decode": fleet}, autoscale=False, roles=("decode",),
                           first_token=first_token)
            return run.itl_slo_attainment >= target

        decode_candidates = self.static_candidates("decode")
        k, ok_decode = smallest(decode_candidates, decode_meets)
        fleet = {"prefill": prefill, "decode": decode_candidates[k]}
        return fleet, self.run(fleet, autoscale=False), ok_prefill and ok_decode


class _Run:
    """The state of one replay (Simulator.run)."""

    def __init__(self, sim: Simulator, fleet, autoscale: bool, roles, first_token) -> None:
        if "prefill" not in roles and first_token is None:
            raise ValueError("a decode-only run needs first_token from a prefill run")
        self.sim = sim
        trace = sim.trace
        self.n = len(trace.time_s)
        self.times = trace.time_s.tolist()
        self.prompts = trace.prompt_tokens.tolist()
        self.outputs = trace.output_tokens.tolist()
        self.autoscale = autoscale
        self.do_prefill, self.do_decode = "prefill" in roles, "decode" in roles
        self.replicas: dict[str, list[_Replica]] = {role: [] for role in ROLES}
        for role in roles:
            for pool, count in fleet[role].items():
                self.replicas[role] += [sim.new_replica(role, pool, 0.0, 0.0)
                                        for _ in range(count)]
        self.ttft = np.full(self.n, np.nan)
        self.first = (np.full(self.n, np.nan) if first_token is None
                      else np.asarray(first_token, dtype=np.float64).copy())
        self.prefill_start = np.full(self.n, np.nan)
        self.gap = np.full(self.n, np.nan)
        self.finish_times: list[float] = []
        self.finish_gaps: list[float] = []
        self.events: list[tuple] = []
        self.seq = 0
        self.state = PolicyState()
        self.token_history: list[tuple[float, float]] = [(0.0, 0.0)]
        self.decisions = self.scale_events = 0
        self.max_ttft = 0.0
        self.timeline: dict[str, list] = {
            "time": [], "request_rate": [], "prompt_tokens_per_second": [], "ttft_p95": [],
            "gap_p95": [], "ttft_attainment": [], "itl_attainment": [], "replicas": [],
            "reason": []}
        self.prefill_speed = sim.profile.prefill_tokens_per_second
        if not self.do_prefill:
            for i in np.argsort(self.first, kind="stable").tolist():
                self.push(float(self.first[i]), _DECODE_ARRIVAL, i)

    def push(self, t: float, kind: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    # -- prefill ------------------------------------------------------------------------

    def prefill_arrive(self, t: float, i: int) -> None:
        best, best_done, best_service = None, math.inf, 0.0
        for rep in self.replicas["prefill"]:
            if rep.draining:
                continue
            service = self.prompts[i] / (self.prefill_speed * rep.speed)
            done = max(t, rep.ready_at, rep.free_at) + service
            if done < best_done:
                best, best_done, best_service = rep, done, service
        best.free_at = best_done
        self.prefill_start[i] = best_done - best_service
        self.first[i] = best_done
        self.ttft[i] = best_done - t
        self.max_ttft = max(self.max_ttft, best_done - t)
        if self.do_decode:
            self.push(best_done, _DECODE_ARRIVAL, i)

    # -- decode -------------------------------------------------------------------------

    def schedule(self, rep: _Replica) -> None:
        rep.version += 1
        if rep.active:
            t_next = rep.last_t + (rep.active[0][0] - rep.clock) / rep.rate[len(rep.active)]
            self.push(t_next, _DECODE_STEP, (rep, rep.version))

    def fill(self, rep: _Replica) -> None:
        while rep.waiting and len(rep.active) < rep.limit:
            i = rep.waiting.popleft()
            heapq.heappush(rep.active, (rep.clock + self.outputs[i] - 1, i))

    def decode_arrive(self, t: float, i: int) -> None:
        if self.outputs[i] <= 1:  # the first token was the whole answer: no gap
            self.gap[i] = 0.0
            self.finish_times.append(t)
            self.finish_gaps.append(0.0)
            return
        best, best_key = None, None
        for rep in self.replicas["decode"]:
            if rep.draining:
                continue
            # ready replicas by load; a starting one only when none is ready
            key = ((0, (len(rep.active) + len(rep.waiting)) / rep.limit) if rep.ready_at <= t
                   else (1, rep.ready_at))
            if best_key is None or key < best_key:
                best, best_key = rep, key
        best.waiting.append(i)
        if best.ready_at <= t:
            best.advance(t)
            if len(best.active) < best.limit:
                self.fill(best)
                self.schedule(best)

    def decode_step(self, t: float, rep: _Replica) -> None:
        rep.advance(t)
        while rep.active and rep.active[0][0] <= rep.clock + 1e-6:
            _, i = heapq.heappop(rep.active)
            gap = (t - self.first[i]) / (self.outputs[i] - 1)
            self.gap[i] = gap
            self.finish_times.append(t)
            self.finish_gaps.append(gap)
        self.fill(rep)
        if rep.draining and not rep.active:
            rep.gone_at = t
        self.schedule(rep)

    def decode_ready(self, t: float, rep: _Replica) -> None:
        if rep.gone_at is not None:
            return
        rep.last_t = t
        self.fill(rep)
        self.schedule(rep)

    # -- the policy ---------------------------------------------------------------------

    def observe(self, t: float) -> Observation:
        sim, w = self.sim, min(self.sim.window, t)
        times = self.sim.trace.time_s
        hi = bisect.bisect_right(self.times, t)
        lo = bisect.bisect_left(self.times, t - w - self.max_ttft - 1.0)
        first = self.first[lo:hi]
        with np.errstate(invalid="ignore"):
            done = (first > t - w) & (first <= t)
            waiting = float(np.count_nonzero(self.prefill_start[lo:hi] > t))
        ttft = self.ttft[lo:hi][done]
        prompt_rate = float(self.sim.trace.prompt_tokens[lo:hi][done].sum()) / w
        ttft_attained = float(np.mean(ttft <= sim.ttft_target)) if ttft.size else None
        f_lo = bisect.bisect_right(self.finish_times, t - w)
        gaps = np.asarray(self.finish_gaps[f_lo:])
        itl_attained = float(np.mean(gaps <= sim.itl_target)) if gaps.size else None
        past = [v for s, v in self.token_history if s <= t - w]
        before = past[-1] if past else 0.0
        generation_rate = (self.token_history[-1][1] - before) / w
        running = sum(len(r.active) for r in self.replicas["decode"] if r.gone_at is None)
        queued = sum(len(r.waiting) for r in self.replicas["decode"] if r.gone_at is None)
        tl = self.timeline
        tl["time"].append(t)
        tl["request_rate"].append(float(np.count_nonzero(times[lo:hi] > t - w)) / w)
        short = min(SHORT_WINDOW_SECONDS, w)
        short_rate = float(np.count_nonzero(times[lo:hi] > t - short)) / short
        tl["prompt_tokens_per_second"].append(prompt_rate)
        tl["ttft_p95"].append(float(np.percentile(ttft, 95)) if ttft.size else None)
        tl["gap_p95"].append(float(np.percentile(gaps, 95)) if gaps.size else None)
        tl["ttft_attainment"].append(ttft_attained)
        tl["itl_attainment"].append(itl_attained)
        return Observation(
            request_rate=float(ttft.size) / w, prompt_tokens_per_second=prompt_rate,
            generation_tokens_per_second=max(0.0, generation_rate), prefill_waiting=waiting,
            decode_running=float(running), decode_waiting=float(queued),
            ttft_attainment=ttft_attained, itl_attainment=itl_attained,
            mean_itl_seconds=float(gaps.mean()) if gaps.size else None,
            arrival_rate=tl["request_rate"][-1], window_seconds=w,
            short_arrival_rate=short_rate, short_window_seconds=short)

    def tick(self, t: float) -> None:
        for rep in self.replicas["decode"]:
            if rep.gone_at is None and rep.ready_at <= t:
                rep.advance(t)
        self.token_history.append((t, sum(r.tokens for r in self.replicas["decode"])))
        observation = self.observe(t)
        current = {role: {p.name: 0 for p in self.sim.spec.role(role).pools}
                   for role in ROLES}
        for role in ROLES:
            for rep in self.replicas[role]:
                if not rep.draining:
                    current[role][rep.pool] += 1
        decision = decide(self.sim.spec, observation, current, {}, self.state, t,
                          self.sim.profile)
        self.state = decision.state
        self.decisions += 1
        if decision.changed:
            self.scale_events += 1
            self.apply(decision.desired, current, t)
        self.timeline["replicas"].append({role: dict(decision.desired[role])
                                          for role in ROLES})
        self.timeline["reason"].append(decision.reason)

    def apply(self, desired, current, t: float) -> None:
        for role in ROLES:
            for pool in self.sim.spec.role(role).pools:
                diff = desired[role][pool.name] - current[role][pool.name]
                for _ in range(max(diff, 0)):
                    rep = self.sim.new_replica(role, pool.name, t, t + self.sim.startup)
                    self.replicas[role].append(rep)
                    if role == "decode":
                        self.push(rep.ready_at, _READY, rep)
                if diff < 0:
                    self.drain(role, pool.name, -diff, t)

    def drain(self, role: str, pool: str, count: int, t: float) -> None:
        """Starting replicas go first, then the least loaded; they take no new work and
        leave once their in-flight work is done (queued decode requests move elsewhere)."""
        live = [r for r in self.replicas[role] if r.pool == pool and not r.draining]

        def order(r: _Replica) -> tuple:
            busy = (max(r.free_at - t, 0.0) if role == "prefill"
                    else len(r.active) + len(r.waiting))
            return (r.ready_at <= t, busy, -r.created)
        for rep in sorted(live, key=order)[:count]:
            rep.draining = True
            if role == "prefill":
                rep.gone_at = max(t, rep.free_at)
                continue
            moved = list(rep.waiting)
            rep.waiting.clear()
            if rep.ready_at > t or not rep.active:
                rep.gone_at = t
                rep.version += 1
            for i in moved:
                self.decode_arrive(t, i)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> RunResult:
        interval = float(self.sim.spec.autoscaling.interval_seconds)
        end = self.sim.trace.duration
        next_tick = interval if self.autoscale and interval <= end else math.inf
        i, n, events, times = 0, self.n, self.events, self.times
        while True:
            t_arrival = times[i] if (i < n and self.do_prefill) else math.inf
            t_event = events[0][0] if events else math.inf
            if next_tick <= t_arrival and next_tick <= t_event and next_tick < math.inf:
                self.tick(next_tick)
                next_tick += interval
                if next_tick > end:
                    next_tick = math.inf
            elif t_event <= t_arrival and t_event < math.inf:
                t, _, kind, payload = heapq.heappop(events)
                if kind == _DECODE_STEP:
                    rep, version = payload
                    if version == rep.version:
                        self.decode_step(t, rep)
                elif kind == _DECODE_ARRIVAL:
                    self.decode_arrive(t, payload)
                else:
                    self.decode_ready(t, payload)
            elif t_arrival < math.inf:
                self.prefill_arrive(t_arrival, i)
                i += 1
            else:
                break
        return self.result()

    def result(self) -> RunResult:
        sim = self.sim
        end = sim.trace.duration
        gpu_seconds = cost_seconds = 0.0
        for role in ROLES:
            for rep in self.replicas[role]:
                gone = end if rep.gone_at is None else min(rep.gone_at, end)
                alive = max(0.0, gone - rep.created)
                gpu_seconds += alive * rep.gpus
                cost_seconds += alive * rep.cost
        met: dict[str, np.ndarray] = {}
        if self.do_prefill:
            met["ttft"] = self.ttft <= sim.ttft_target
        if self.do_decode:
            met["itl"] = self.gap <= sim.itl_target
        windows = {key: window_attainment(sim.trace.time_s, ok, end) for key, ok in met.items()}
        return RunResult(
            ttft_slo_attainment=float(np.mean(met["ttft"])) if "ttft" in met else math.nan,
            itl_slo_attainment=float(np.mean(met["itl"])) if "itl" in met else math.nan,
            gpu_hours=gpu_seconds / 3600.0, cost=cost_seconds / 3600.0, ttft=self.ttft,
            mean_gap=self.gap, first_token=self.first, timeline=self.timeline,
            decisions=self.decisions, scale_events=self.scale_events, windows=windows)
