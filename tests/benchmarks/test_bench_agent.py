"""The agent-session benchmark: its trace is seeded and bounded, and its smoke mode replays
two sessions through `baton up` with the cache on and off, so the full run cannot rot."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2] / "benchmarks" / "agent"

pytestmark = pytest.mark.timeout(400)


def _load(name: str):
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"bench_agent_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_trace_is_seeded_shared_and_bounded():
    trace = _load("session_trace")
    a = trace.generate(3, 6, seed=11, system_tokens=300)
    assert a.to_json() == trace.generate(3, 6, seed=11, system_tokens=300).to_json()
    assert a.to_json() != trace.generate(3, 6, seed=12, system_tokens=300).to_json()
    assert trace.Trace.from_json(a.to_json()) == a
    assert {t.kind for s in a.sessions for t in s.turns[1:]} == {"user", "tool"}
    assert all(s.turns[0].kind == "user" for s in a.sessions)
    assert all(200 <= len(t.tokens) <= 4000 for s in a.sessions for t in s.turns)
    assert a.new_tokens(0) == 3 * 300 + sum(len(s.turns[0].tokens) for s in a.sessions)
    bounded = trace.generate(3, 6, seed=11, system_tokens=300, max_history=3000)
    assert bounded.longest_history() <= 3000
    with pytest.raises(ValueError, match="max_history=400 cannot hold"):
        trace.generate(1, 6, seed=1, system_tokens=300, max_history=400)
    with pytest.raises(ValueError, match="sessions=0"):
        trace.generate(0, 6, seed=1)


def test_bench_agent_smoke_replays_with_the_cache_on_and_off(tmp_path):
    bench = _load("bench_agent")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-agent.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-agent\.md", report.name)
    text = report.read_text()
    assert "## cache on, prefix-aware" in text and "## cache off, least-loaded" in text
    figures = json.loads(report.with_suffix(".json").read_text())
    hot, cold = figures["cache on, prefix-aware"], figures["cache off, least-loaded"]
    assert len(hot) == len(cold) == 3
    # Turn 1 is cold everywhere; then the decode workers hold the sessions and prefill the
    # new tokens themselves: nothing moves, little more than the new tokens is computed.
    assert hot[0]["computed"] == cold[0]["computed"] == hot[0]["new_tokens"]
    for turn in hot[1:]:
        assert turn["transferred"] == 0 and turn["local"] == turn["requests"]
        assert turn["computed"] <= 1.3 * turn["new_tokens"]
        assert turn["cached"] > 0
    for turn in cold[1:]:
        assert turn["computed"] > 2 * turn["new_tokens"] and turn["transferred"] > 0
    assert "Targets:" in text and "NOT met" not in text
    with pytest.raises(ValueError, match="--configs"):
        bench.parse_configs("on:random")
