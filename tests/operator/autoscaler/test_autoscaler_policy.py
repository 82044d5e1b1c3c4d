"""The autoscaling policy as a pure function: what each signal does to which role and pool."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from baton.operator.autoscaler.policy import (
    DECODE_HEADROOM,
    ITL_STEP_MARGIN,
    PREFILL_MAX_UTILIZATION,
    PREFILL_TAIL_FACTOR,
    Observation,
    PolicyState,
    decide,
    lead_seconds,
    place,
    pool_capacities,
    pool_order,
)
from baton.operator.autoscaler.profile import ReplicaProfile
from baton.operator.spec import Model

PROFILE = ReplicaProfile(prefill_tokens_per_second=10000.0,
                         decode_step_seconds=((1, 0.01), (64, 0.02), (128, 0.04)),
                         max_decode_batch=128)
T0 = 1_000_000.0


def spec_dict(**kwargs) -> dict:
    return make_spec(raw=True, **kwargs)


def make_spec(*, prefill=None, decode=None, window=300, interval=30, ttft="2.0", itl="0.03",
              attainment="0.95", max_concurrency=256, raw=False, ramp=None, startup=None):
    default_pools = [
        {"name": "hopper", "minReplicas": 1, "maxReplicas": 8, "relativeSpeed": "1",
         "costPerHour": "4"},
        {"name": "blackwell", "minReplicas": 0, "maxReplicas": 4, "relativeSpeed": "2",
         "costPerHour": "6"},
    ]
    obj = {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
           "metadata": {"name": "m", "namespace": "ns"},
           "spec": {"source": {"uri": "pvc://models/m"},
                    "prefill": {"pools": prefill or default_pools},
                    "decode": {"pools": decode or default_pools,
                               "maxConcurrency": max_concurrency},
                    "autoscaling": {"enabled": True, "prometheusUrl": "http://prom:9090",
                                    "intervalSeconds": interval,
                                    "scaleDownStabilizationSeconds": window,
                                    "targets": {"timeToFirstTokenSeconds": ttft,
                                                "interTokenLatencySeconds": itl,
                                                "attainment": attainment}}}}
    if ramp is not None:
        obj["spec"]["autoscaling"]["rampPerMinute"] = ramp
    if startup is not None:
        obj["spec"]["autoscaling"]["startupSeconds"] = startup
    return obj["spec"] if raw else Model.from_resource(obj).spec


def obs(*, prompt=5000.0, rate=2.0, generation=2000.0, running=40.0, waiting=0.0,
        decode_waiting=0.0, ttft=0.99, itl=0.99, gap=0.02) -> Observation:
    return Observation(request_rate=rate, prompt_tokens_per_second=prompt,
                       generation_tokens_per_second=generation, prefill_waiting=waiting,
                       decode_running=running, decode_waiting=decode_waiting,
                       ttft_attainment=ttft, itl_attainment=itl, mean_itl_seconds=gap)


def units(replicas: dict, role: str) -> float:
    """Capacity in reference replicas (hopper 1, blackwell 2)."""
    speed = {"hopper": 1.0, "blackwell": 2.0}
    return sum(n * speed[pool] for pool, n in replicas[role].items())


def fleet(prefill=(1, 0), decode=(1, 0)):
    return {"prefill": {"hopper": prefill[0], "blackwell": prefill[1]},
            "decode": {"hopper": decode[0], "blackwell": decode[1]}}


def test_capacities_follow_the_documented_model():
    spec = make_spec()
    mean_prompt = 2500.0
    caps = pool_capacities(spec, "prefill", PROFILE, mean_prompt, replicas=2)
    for name, speed in (("hopper", 1.0), ("blackwell", 2.0)):
        service = mean_prompt / (10000.0 * speed)
        rho = min(PREFILL_MAX_UTILIZATION,
                  1 - PREFILL_TAIL_FACTOR * service / (2 * (2.0 - service)))
        assert caps[name] == pytest.approx(10000.0 * speed * rho)
    caps = pool_capacities(spec, "decode", PROFILE)
    for name, speed in (("hopper", 1.0), ("blackwell", 2.0)):
        # brute force: the largest batch within the step limit, up to 128 * speed sequences
        limit = min(256, int(128 * speed))
        best = max(b for b in range(1, limit + 1)
                   if PROFILE.decode_step(b, speed) <= 0.03 * ITL_STEP_MARGIN)
        expected = best * speed / PROFILE.decode_step(best) * DECODE_HEADROOM
        assert caps[name] == pytest.approx(expected)


def test_ttft_breach_scales_prefill_and_not_decode():
    spec = make_spec()
    current = fleet(prefill=(2, 0), decode=(2, 0))
    d = decide(spec, obs(prompt=8000.0, ttft=0.80), current, {}, PolicyState(), T0, PROFILE)
    assert units(d.desired, "prefill") > units(current, "prefill")
    assert d.desired["decode"] == current["decode"]
    assert "TTFT attainment 0.800 < 0.95" in d.reason
    assert "capacity x1.50" in d.reason
    assert d.changed and d.state.last_scale_time == T0


def test_itl_breach_scales_decode_and_not_prefill():
    spec = make_spec()
    current = fleet(prefill=(1, 0), decode=(3, 0))
    d = decide(spec, obs(prompt=4000.0, generation=3000.0, itl=0.70), current, {},
               PolicyState(), T0, PROFILE)
    assert d.desired["prefill"] == current["prefill"]
    assert units(d.desired, "decode") > units(current, "decode")
    assert "ITL attainment 0.700" in d.reason


def test_boost_waits_until_added_replicas_show():
    spec = make_spec()
    current = fleet(prefill=(2, 0))
    first = decide(spec, obs(prompt=8000.0, ttft=0.8), current, {}, PolicyState(), T0,
                   PROFILE)
    again = decide(spec, obs(prompt=8000.0, ttft=0.8), first.desired, {}, first.state,
                   T0 + 30, PROFILE)
    assert again.desired == first.desired  # no second boost while the first one starts
    # the boost's replicas start (startupSeconds) and show in a rate window (60 s)
    settle = spec.autoscaling.startup_seconds + 60
    later = decide(spec, obs(prompt=8000.0, ttft=0.8), first.desired, {}, again.state,
                   T0 + settle + 1, PROFILE)
    assert units(later.desired, "prefill") > units(first.desired, "prefill")


def test_cheaper_capacity_fills_first_then_overflows():
    # blackwell: 6 / 2 = 3 per unit of capacity, hopper 4 per unit: blackwell first
    spec = make_spec()
    assert [p.name for p in pool_order(spec.prefill.pools)] == ["blackwell", "hopper"]
    per_bw = pool_capacities(spec, "prefill", PROFILE, 2500.0, 1)["blackwell"]
    d = decide(spec, obs(prompt=2 * per_bw * 0.95, rate=2 * per_bw * 0.95 / 2500),
               fleet(), {}, PolicyState(), T0, PROFILE)
    # hopper keeps its minReplicas (1, already some capacity); blackwell takes the rest
    assert d.desired["prefill"]["hopper"] == 1
    assert d.desired["prefill"]["blackwell"] >= 1
    big = decide(spec, obs(prompt=20 * per_bw, rate=20 * per_bw / 2500), fleet(), {},
                 PolicyState(), T0, PROFILE)
    assert big.desired["prefill"]["blackwell"] == 4  # its max, then hopper takes overflow
    assert big.desired["prefill"]["hopper"] > 1


def test_pending_pool_counts_as_full_and_overflows():
    spec = make_spec()
    current = fleet(prefill=(1, 4))
    pending = {"prefill": {"blackwell": 2}}
    per_bw = pool_capacities(spec, "prefill", PROFILE, 2500.0, 5)["blackwell"]
    load = obs(prompt=4 * per_bw, rate=4 * per_bw / 2500)
    d = decide(spec, load, current, pending, PolicyState(), T0, PROFILE)
    assert d.desired["prefill"]["blackwell"] == 2  # what it could schedule
    assert d.desired["prefill"]["hopper"] > 1       # the overflow
    assert d.drain["prefill"] == {"blackwell": 2}
    assert "pool blackwell is full at 2" in d.reason
    # the Pending pods are gone next time; the pool still counts as full for the window
    nxt = decide(spec, load, d.desired, {}, d.state, T0 + 30, PROFILE)
    assert nxt.desired["prefill"]["blackwell"] == 2
    # after the window it is tried again
    later = decide(spec, load, nxt.desired, {}, nxt.state, T0 + 400, PROFILE)
    assert later.desired["prefill"]["blackwell"] > 2


def test_no_scale_down_inside_the_stabilization_window():
    spec = make_spec(window=300)
    high = obs(prompt=60000.0, rate=24.0)
    d1 = decide(spec, high, fleet(), {}, PolicyState(), T0, PROFILE)
    up = d1.desired
    assert sum(up["prefill"].values()) > 1
    low = obs(prompt=1000.0, rate=0.4)
    state, now = d1.state, T0
    for _ in range(9):  # 270 s of low load
        now += 30
        d = decide(spec, low, up, {}, state, now, PROFILE)
        assert d.desired == up, d.reason
        assert not d.drain["prefill"]
        state = d.state
    assert "stabilization window" in d.reason
    d = decide(spec, low, up, {}, state, T0 + 301, PROFILE)
    assert sum(d.desired["prefill"].values()) < sum(up["prefill"].values())
    assert sum(d.drain["prefill"].values()) == (sum(up["prefill"].values())
                                                - sum(d.desired["prefill"].values()))


def test_scale_up_is_immediate_inside_the_window():
    spec = make_spec(window=300)
    d1 = decide(spec, obs(prompt=1000.0, rate=0.4), fleet(), {}, PolicyState(), T0, PROFILE)
    d2 = decide(spec, obs(prompt=60000.0, rate=24.0), d1.desired, {}, d1.state, T0 + 30,
                PROFILE)
    assert units(d2.desired, "prefill") > units(d1.desired, "prefill")


def test_min_and_max_are_respected():
    pools = [{"name": "hopper", "minReplicas": 2, "maxReplicas": 3, "relativeSpeed": "1",
              "costPerHour": "4"}]
    spec = make_spec(prefill=pools, decode=pools)
    idle = obs(prompt=0.0, rate=0.0, generation=0.0, running=0.0, ttft=None, itl=None,
               gap=None)
    current = {"prefill": {"hopper": 2}, "decode": {"hopper": 2}}
    d = decide(spec, idle, current, {}, PolicyState(), T0, PROFILE)
    assert d.desired == {"prefill": {"hopper": 2}, "decode": {"hopper": 2}}
    flood = obs(prompt=1e7, rate=4000.0, generation=1e6, running=5000.0)
    d = decide(spec, flood, current, {}, PolicyState(), T0, PROFILE)
    assert d.desired == {"prefill": {"hopper": 3}, "decode": {"hopper": 3}}
    assert set(d.limited) == {"prefill", "decode"}
    assert "demand exceeds maxReplicas" in d.reason


def test_a_role_keeps_one_replica_when_every_minimum_is_zero():
    pools = [{"name": "a", "minReplicas": 0, "maxReplicas": 3, "costPerHour": "5"},
             {"name": "b", "minReplicas": 0, "maxReplicas": 3, "costPerHour": "4"}]
    spec = make_spec(prefill=pools, decode=pools)
    idle = obs(prompt=0.0, rate=0.0, generation=0.0, running=0.0, ttft=None, itl=None,
               gap=None)
    current = {"prefill": {"a": 0, "b": 0}, "decode": {"a": 0, "b": 0}}
    d = decide(spec, idle, current, {}, PolicyState(), T0, PROFILE)
    assert d.desired == {"prefill": {"a": 0, "b": 1}, "decode": {"a": 0, "b": 1}}


def test_missing_metrics_hold_the_last_decision():
    spec = make_spec()
    last = fleet(prefill=(3, 1), decode=(2, 2))
    state = PolicyState(desired=last, last_scale_time=T0 - 100)
    d = decide(spec, None, fleet(), {}, state, T0, PROFILE,
               missing="no series for 'baton_requests_running'")
    assert d.held
    assert d.desired == last
    assert "holding the last decision" in d.reason
    assert "baton_requests_running" in d.reason
    assert d.state.last_scale_time == T0 - 100
    # without any decision yet, it holds what the pools have, never zero
    d = decide(spec, None, fleet(prefill=(2, 0), decode=(1, 1)), {}, PolicyState(), T0,
               PROFILE, missing="prometheus down")
    assert d.desired == fleet(prefill=(2, 0), decode=(1, 1))


def test_a_rising_load_is_met_ahead_of_time():
    spec = make_spec()
    state, current = PolicyState(), fleet()
    for k in range(6):  # prompt tokens/s rising by 2000 every 30 s
        d = decide(spec, obs(prompt=10000.0 + 2000.0 * k, rate=4.0 + 0.8 * k), current, {},
                   state, T0 + 30 * k, PROFILE)
        state, current = d.state, d.desired
    assert "rising" in d.reason
    flat = decide(spec, obs(prompt=20000.0, rate=8.0), fleet(), {}, PolicyState(), T0,
                  PROFILE)
    assert d.demand["prefill"] > flat.demand["prefill"]


MEAN_PROMPT, MEAN_OUTPUT = 2500.0, 400.0


def arriving(rate: float, *, finished: float | None = None, waiting: float = 0.0,
             ttft: float | None = 1.0) -> Observation:
    """A steady workload: `rate` requests/s arrive, `finished` of them (default all) get
    their first token; latency within target unless ttft says otherwise."""
    done = rate if finished is None else finished
    return Observation(request_rate=done, prompt_tokens_per_second=done * MEAN_PROMPT,
                       generation_tokens_per_second=rate * MEAN_OUTPUT,
                       prefill_waiting=waiting, decode_running=rate * MEAN_OUTPUT * 0.02,
                       decode_waiting=0.0, ttft_attainment=ttft, itl_attainment=1.0,
                       mean_itl_seconds=0.02, arrival_rate=rate, window_seconds=60.0)


def capacity_of(spec, replicas: dict, role: str) -> float:
    caps = pool_capacities(spec, role, PROFILE, MEAN_PROMPT, sum(replicas[role].values()))
    return sum(n * caps[pool] for pool, n in replicas[role].items())


def replay(spec, rates, *, current=None, state=None, start=T0, step=30.0, **kwargs):
    """Feeds the policy one observation per interval, applying each decision; returns the
    decisions and the fleets they were made on."""
    state, current = state or PolicyState(), current or fleet()
    decisions, fleets = [], []
    for k, rate in enumerate(rates):
        d = decide(spec, arriving(rate, **kwargs), current, {}, state, start + step * k,
                   PROFILE)
        decisions.append(d)
        fleets.append(current)
        state, current = d.state, d.desired
    return decisions, fleets


def test_a_rising_arrival_rate_scales_up_before_any_latency_breach():
    spec = make_spec()
    # 10 minutes at 4 req/s, then +1.6 req/s per minute; every observation has TTFT and ITL
    # within target and no queue: only the arrivals say what is coming
    rates = [4.0] * 20 + [4.0 + 0.8 * k for k in range(1, 15)]
    decisions, fleets = replay(spec, rates)
    settled = fleets[20]
    k, d = next((k, d) for k, d in enumerate(decisions)
                if k >= 20 and units(d.desired, "prefill") > units(settled, "prefill"))
    # prefill grew while the fleet it had still carried the load it measured
    assert rates[k] * MEAN_PROMPT < capacity_of(spec, fleets[k], "prefill")
    assert "rising" in d.reason and "expected 120 s ahead" in d.reason
    # sized for the load when replicas started now serve: the measured rate is half a rate
    # window old, and those replicas serve a start-up later
    lead = spec.autoscaling.startup_seconds + 60 / 2
    assert lead == lead_seconds(spec, 60.0) == 120
    expected = (rates[k] + 1.6 * lead / 60) * MEAN_PROMPT
    assert d.demand["prefill"] == pytest.approx(expected, rel=0.25)
    assert capacity_of(spec, d.desired, "prefill") >= 0.95 * expected
    # the level alone (no history) does not ask for that much
    alone = decide(spec, arriving(rates[k]), fleets[k], {}, PolicyState(), T0, PROFILE)
    assert alone.demand["prefill"] < 0.8 * d.demand["prefill"]
    # decode follows the same arrivals
    assert d.demand["decode"] > 1.2 * rates[k] * MEAN_OUTPUT


def test_arrivals_not_finished_prompts_size_prefill():
    # a saturated prefill finishes only what it can: the arrivals say what it needs
    spec = make_spec()
    current = fleet(prefill=(2, 0))
    saturated = arriving(12.0, finished=8.0)
    d = decide(spec, saturated, current, {}, PolicyState(), T0, PROFILE)
    assert d.demand["prefill"] == pytest.approx(12.0 * MEAN_PROMPT)
    assert capacity_of(spec, d.desired, "prefill") >= 12.0 * MEAN_PROMPT
    assert "arrivals 12/s" in d.reason


def test_the_projection_grows_with_the_start_up_time():
    rates = [4.0] * 10 + [4.0 + 0.8 * k for k in range(1, 6)]
    quick, _ = replay(make_spec(), rates)
    slow_spec = Model.from_resource({"kind": "Model", "metadata": {"name": "m"}, "spec": {
        **spec_dict(), "autoscaling": {**spec_dict()["autoscaling"], "startupSeconds": 300}}})
    slow, _ = replay(slow_spec.spec, rates)
    assert "expected 330 s ahead" in slow[-1].reason
    assert slow[-1].demand["prefill"] > quick[-1].demand["prefill"] * 1.3


def test_a_flat_high_load_does_not_keep_adding_replicas():
    spec = make_spec()
    rng = np.random.default_rng(5)
    # 40 minutes at 20 req/s, each rate window with its Poisson noise
    rates = (rng.poisson(20 * 60, size=80) / 60).tolist()
    decisions, fleets = replay(spec, rates)
    totals = [units(d.desired, "prefill") + units(d.desired, "decode") for d in decisions]
    settled = totals[10]
    assert max(totals[10:]) <= settled + 2  # a noise peak in the window, never a climb
    increases = sum(1 for a, b in zip(totals[10:], totals[11:]) if b > a)
    assert increases <= 2, totals
    assert not any("rising" in d.reason for d in decisions)
    # and without noise, nothing changes at all after the first decision
    decisions, _ = replay(spec, [20.0] * 30)
    assert all(d.desired == decisions[0].desired for d in decisions)
    assert not any(d.changed for d in decisions[1:])


def test_a_dip_and_its_recovery_is_no_rise():
    spec = make_spec()
    rates = [10.0] * 12 + [8.6, 9.5, 10.4, 10.8]
    decisions, _ = replay(spec, rates)
    assert not any("rising" in d.reason or "expected" in d.reason for d in decisions)
    assert decisions[-1].demand["prefill"] == pytest.approx(10.8 * MEAN_PROMPT)


def test_a_falling_load_scales_down_only_after_the_window_and_drains():
    spec = make_spec(window=300)
    high, low = 24.0, 4.0
    # 10 minutes high, a 5-minute linear fall, then low
    rates = [high] * 20 + [high - (high - low) * k / 10 for k in range(1, 11)] + [low] * 20
    decisions, fleets = replay(spec, rates)
    times = [T0 + 30 * k for k in range(len(rates))]
    peak = units(decisions[19].desired, "prefill")
    first_down = next(k for k, d in enumerate(decisions)
                      if units(d.desired, "prefill") < units(fleets[k], "prefill"))
    # nothing is removed inside the window after the last decision that needed the peak
    assert times[first_down] - times[19] >= 300
    for k in range(20, first_down):
        assert units(decisions[k].desired, "prefill") == peak
    assert any("holding for the 300 s stabilization window" in decisions[k].reason
               for k in range(20, first_down))
    for k, d in enumerate(decisions):
        before, after = fleets[k], d.desired
        for role in ("prefill", "decode"):
            removed = {pool: before[role][pool] - n for pool, n in after[role].items()
                       if n < before[role][pool]}
            assert d.drain[role] == removed  # whatever shrinks is drained
            if removed:
                # every demand the window saw still fits in the smaller fleet
                needed = max(e.needed[0 if role == "prefill" else 1]
                             for e in d.state.recent if times[k] - e.time < 300)
                assert capacity_of(spec, after, role) >= needed - 1e-6
    assert units(decisions[-1].desired, "prefill") < peak
    assert decisions[-1].desired == decisions[-2].desired  # settled at the low load


def test_a_projection_holds_only_until_its_replicas_would_serve():
    # a rise that stops: what was projected goes once the replicas started for it would be
    # ready (lead), without waiting for the stabilization window
    spec = make_spec(window=600)
    rates = [4.0] * 12 + [4.0 + 1.0 * k for k in range(1, 7)] + [10.0] * 16
    decisions, _ = replay(spec, rates)
    demands = [d.demand["prefill"] for d in decisions]
    top = max(range(len(demands)), key=demands.__getitem__)
    assert demands[top] > 1.1 * 10.0 * MEAN_PROMPT  # the projection went beyond 10 req/s
    settled = next(k for k in range(top, len(demands))
                   if demands[k] == pytest.approx(10.0 * MEAN_PROMPT))
    assert (settled - top) * 30 <= lead_seconds(spec, 60.0) + 30
    assert "holding" not in decisions[settled].reason


def test_a_growing_queue_asks_for_more_than_a_steady_one():
    spec = make_spec()
    current = fleet(prefill=(2, 0))
    base = decide(spec, arriving(6.0, waiting=1.0), current, {}, PolicyState(), T0, PROFILE)
    steady = decide(spec, arriving(6.0, waiting=20.0), current, {},
                    replace(base.state, recent=base.state.recent[:-1] + (
                        replace(base.state.recent[-1], prefill_waiting=20.0),)),
                    T0 + 30, PROFILE)
    growing = decide(spec, arriving(6.0, waiting=20.0), current, {}, base.state, T0 + 30,
                     PROFILE)
    # 18 queued beyond one per replica, cleared by the next decision (30 s)
    assert steady.demand["prefill"] == pytest.approx(6.0 * MEAN_PROMPT + 18 * MEAN_PROMPT
                                                     / 30)
    assert growing.demand["prefill"] > steady.demand["prefill"]
    assert "20 queued, growing 38/min" in growing.reason


def test_a_breach_while_added_replicas_start_is_no_reason_to_boost():
    spec = make_spec()
    rates = [4.0] * 10 + [4.0 + 0.8 * k for k in range(1, 5)]
    decisions, _ = replay(spec, rates)
    up = decisions[-1]
    assert units(up.desired, "prefill") > units(decisions[9].desired, "prefill")
    # the latency breaches before those replicas serve: the projection already covers it
    breach = decide(spec, arriving(rates[-1], ttft=0.8), up.desired, {}, up.state,
                    T0 + 30 * len(rates), PROFILE)
    assert "TTFT attainment 0.800 < 0.95" in breach.reason
    assert "capacity x" not in breach.reason
    assert units(breach.desired, "prefill") <= units(up.desired, "prefill") + 1


def test_reasons_say_what_changed_and_why():
    spec = make_spec()
    rates = [4.0] * 10 + [4.0 + 0.8 * k for k in range(1, 5)]
    decisions, fleets = replay(spec, rates)
    k = next(k for k in range(10, len(rates))
             if decisions[k].desired["prefill"] != fleets[k]["prefill"])
    up, text = decisions[k], decisions[k].reason
    # "<role> <pool> <before> -> <after>" for each changed pool, then the load and the lead
    before, after = fleets[k], up.desired
    changed = [f"{pool} {before['prefill'][pool]} -> {n}"
               for pool, n in after["prefill"].items() if n != before["prefill"][pool]]
    assert changed and all(c in text for c in changed)
    assert text.startswith("prefill ")
    assert "prompt tokens/s expected 120 s ahead, when replicas started now serve" in text
    assert "rising" in text and "/s per minute" in text
    assert "; decode " in text and "generated tokens/s" in text


def test_decode_demand_counts_queued_sequences():
    spec = make_spec()
    calm = decide(spec, obs(generation=2000.0, running=40.0), fleet(), {}, PolicyState(),
                  T0, PROFILE)
    queued = decide(spec, obs(generation=2000.0, running=40.0, decode_waiting=400.0),
                    fleet(), {}, PolicyState(), T0, PROFILE)
    assert queued.demand["decode"] == pytest.approx(440.0 / 0.03)
    assert units(queued.desired, "decode") > units(calm.desired, "decode")


def test_place_covers_the_demand_with_the_fewest_replicas_in_the_last_pool():
    spec = make_spec()
    pools = pool_order(spec.prefill.pools)
    capacity = {"blackwell": 17000.0, "hopper": 8000.0}
    ceiling = {p.name: p.max_replicas for p in pools}
    for demand in (0.0, 1.0, 16999.0, 17001.0, 68000.0, 68001.0, 100000.0):
        replicas, short = place(demand, pools, capacity, ceiling)
        supplied = sum(replicas[p] * capacity[p] for p in replicas)
        assert not short and supplied >= demand
        assert replicas["hopper"] >= 1  # its minReplicas
        if demand > 4 * 17000.0 + 8000.0:
            # blackwell is full; one hopper fewer would not cover the demand
            assert replicas["blackwell"] == 4
            assert supplied - capacity["hopper"] < demand
    replicas, short = place(1e9, pools, capacity, ceiling)
    assert short and replicas == {"blackwell": 4, "hopper": 8}


def test_observation_rejects_nonsense():
    with pytest.raises(ValueError, match="prompt_tokens_per_second"):
        obs(prompt=-1.0)
    with pytest.raises(ValueError, match="ttft_attainment"):
        obs(ttft=1.5)
    with pytest.raises(ValueError, match="request_rate"):
        obs(rate=math.nan)


def test_a_pool_too_slow_for_the_itl_target_gets_no_decode_work():
    # the profile's batch-1 step is 10 ms; at ITL 0.011 (9.9 ms per step after the margin) a
    # relativeSpeed 1 replica cannot keep up, a relativeSpeed 2 one can
    spec = make_spec(itl="0.011")
    caps = pool_capacities(spec, "decode", PROFILE)
    assert caps["hopper"] == 0 and caps["blackwell"] > 0
    d = decide(spec, obs(generation=20000.0, running=100.0), fleet(), {}, PolicyState(), T0,
               PROFILE)
    assert d.desired["decode"]["hopper"] == 1  # its minReplicas, nothing more
    assert d.desired["decode"]["blackwell"] >= 1
    assert "pool hopper cannot meet the ITL target" in d.reason


def test_spare_capacity_for_the_spec_ramp_beyond_what_each_role_absorbs():
    big = [{"name": "hopper", "minReplicas": 1, "maxReplicas": 200, "relativeSpeed": "1",
            "costPerHour": "4"}]
    load = arriving(40.0)
    fleets = {}
    for ramp in ("0", "0.1", "0.3"):
        spec = make_spec(prefill=big, decode=big, ramp=ramp, startup=90)
        d = decide(spec, load, fleet(), {}, PolicyState(), T0, PROFILE)
        fleets[ramp] = d.desired
        for role in ("prefill", "decode"):
            assert capacity_of(spec, d.desired, role) >= d.demand[role]
    spec = make_spec(prefill=big, decode=big, ramp="0.3", startup=90)
    # 0.3/min over 90 + 30 s: 0.6 of the load; prefill keeps 0.4 of spare, decode 0.55
    assert spec.autoscaling.ramp_headroom() == pytest.approx(0.6)
    d = decide(spec, load, fleet(), {}, PolicyState(), T0, PROFILE)
    assert capacity_of(spec, d.desired, "prefill") >= 1.4 * d.demand["prefill"]
    assert capacity_of(spec, d.desired, "decode") >= 1.55 * d.demand["decode"]
    # 0.1/min: 0.2 of the load, all of it absorbed by prefill's planned utilization
    assert fleets["0.1"]["prefill"] == fleets["0"]["prefill"]
    assert units(fleets["0.1"], "decode") > units(fleets["0"], "decode")
    assert units(fleets["0.3"], "prefill") > units(fleets["0.1"], "prefill")


def test_a_ramp_is_projected_from_the_short_window_at_its_onset():
    spec = make_spec()
    state, current = PolicyState(), fleet()
    for k in range(8):  # steady at 10 req/s
        d = decide(spec, arriving(10.0), current, {}, state, T0 + 30 * k, PROFILE)
        state, current = d.state, d.desired
    steady = replace(arriving(10.0), short_arrival_rate=10.3, short_window_seconds=30.0)
    onset = replace(arriving(10.0), short_arrival_rate=14.0, short_window_seconds=30.0)
    calm = decide(spec, steady, current, {}, state, T0 + 240, PROFILE)
    seen = decide(spec, onset, current, {}, state, T0 + 240, PROFILE)
    assert calm.demand == pytest.approx(decide(spec, arriving(10.0), current, {}, state,
                                               T0 + 240, PROFILE).demand)
    # 4 req/s more over a window 15 s younger: 0.27 req/s per second, projected 120 s ahead
    assert seen.demand["prefill"] > calm.demand["prefill"] * 1.5
    assert "expected 120 s ahead" in seen.reason
