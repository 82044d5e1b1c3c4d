"""The end-to-end benchmark runs on a tiny model on the CPU with real processes (`baton up`
for the disaggregated mode, the aggregated server), so the GPU run does not find a broken
script; the load generator's schedule and percentiles are checked on their own."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e" / "bench_disagg.py"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_disagg_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_disagg_smoke_serves_both_modes(bench, tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-disagg.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu-disagg\.md", report.name)
    text = report.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| (disagg|agg) \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["disagg", "agg"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(bench.HEADER)
        assert cells[3] == "1 + 3" and cells[4] == "0", row  # uniform, 1.5 s: 0.5 | .25 .75 1.25
        ttft = [float(c) for c in cells[5:8]]
        itl = [float(c) for c in cells[10:13]]
        assert 0 < ttft[0] <= ttft[1] <= ttft[2] and 0 <= itl[0] <= itl[1] <= itl[2], row
    assert "FAILED" not in text and "MPS: not applicable" in text
    figures = json.loads(report.with_suffix(".json").read_text())
    assert [r["mode"] for r in figures["runs"]] == ["disagg", "agg"]
    assert all(r["failed"] == 0 and r["output_tokens_per_s"] > 0 for r in figures["runs"])


def test_bench_disagg_refuses_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--long-rates", "1,-2"])
    with pytest.raises(ValueError, match="--modes"):
        bench.parse_modes("disagg,pd")
    with pytest.raises(ValueError, match="--long-rates"):
        bench.parse_rates("fast")


def test_schedule_is_seeded_and_holds_its_rates(bench):
    import loadgen

    w = loadgen.Workload(long_rate=2.0, short_rate=5.0, duration_s=200.0, long_len=7,
                         short_len=3, output_len=4, vocab_size=50, seed=3)
    arrivals = loadgen.schedule(w)
    assert arrivals == loadgen.schedule(w)
    assert [a.at for a in arrivals] == sorted(a.at for a in arrivals)
    assert all(0 <= a.at < 200 for a in arrivals)
    longs = [a for a in arrivals if a.kind == "long"]
    shorts = [a for a in arrivals if a.kind == "short"]
    # Poisson counts: mean rate * duration, standard deviation its square root (~3 sigma).
    assert abs(len(longs) - 400) < 60 and abs(len(shorts) - 1000) < 95
    assert {len(a.prompt) for a in longs} == {7} and {len(a.prompt) for a in shorts} == {3}
    assert all(5 <= t < 50 for a in arrivals for t in a.prompt)
    uniform = loadgen.schedule(loadgen.Workload(1.0, 0.0, 3.0, 4, 4, 2, 50,
                                                arrivals="uniform"))
    assert [a.at for a in uniform] == [0.5, 1.5, 2.5]
    with pytest.raises(ValueError, match="long_rate, short_rate"):
        loadgen.schedule(loadgen.Workload(0.0, 0.0, 3.0, 4, 4, 2, 50))
    with pytest.raises(ValueError, match="arrivals"):
        loadgen.schedule(loadgen.Workload(1.0, 0.0, 3.0, 4, 4, 2, 50, arrivals="bursty"))


def test_percentiles_and_summary(bench):
    import loadgen

    assert loadgen.percentiles(list(range(101))) == [50, 90, 99]
    assert loadgen.percentiles([4.0]) == [4.0, 4.0, 4.0]
    assert loadgen.percentiles([1.0, 2.0], (50,)) == [1.5]
    assert all(math.isnan(x) for x in loadgen.percentiles([]))
    ok = loadgen.Outcome("short", sent_at=10.0, token_times=[10.5, 10.6, 10.6, 10.9])
    slow = loadgen.Outcome("long", sent_at=10.0, token_times=[12.0, 12.2])
    failed = loadgen.Outcome("long", sent_at=10.0, error="HTTP 500: boom")
    s = loadgen.summarize("agg", 1.0, [ok, slow, failed], wall_s=2.0)
    assert s.sent == {"long": 2, "short": 1} and s.failed == 1
    assert s.ttft_by_kind["short"] == pytest.approx([0.5] * 3)
    assert s.ttft_by_kind["long"] == pytest.approx([2.0] * 3)
    assert s.itl == pytest.approx(loadgen.percentiles([0.1, 0.0, 0.3, 0.2]))
    assert s.output_tokens_per_s == pytest.approx(3.0)
    assert s.errors == ["HTTP 500: boom"]


def test_a_mode_that_dies_is_reported_and_fails_the_run(bench, tmp_path, monkeypatch):
    def start_dying(mode, spec_path, config_path, run_dir, env):
        argv = [sys.executable, "-c", "import sys; print('no GPU for you'); sys.exit(3)"]
        return bench.Service(mode, argv, env, run_dir / f"{mode}.log", bench.free_port())

    monkeypatch.setattr(bench, "start_mode", start_dying)
    assert bench.main(["--smoke", "--modes", "agg", "--out", str(tmp_path)]) == 1
    (report,) = tmp_path.glob("*-cpu-disagg.md")
    text = report.read_text()
    assert "FAILED" in text
    assert "- agg: agg exited with 3 while starting: ... no GPU for you" in text
    assert not re.search(r"^\| agg \|", text, re.M)
    assert json.loads(report.with_suffix(".json").read_text())["failures"]


def test_aggregated_backend_maps_sampling_like_the_workers(bench):
    from aggregated import engine_sampling

    from baton.workers.router.backend import Sampling

    plain = engine_sampling(Sampling(max_tokens=7, temperature=0.0))
    assert (plain.max_tokens, plain.temperature, plain.logprobs, plain.seed) == (7, 0.0, False,
                                                                                None)
    assert engine_sampling(Sampling(max_tokens=1, logprobs=0)).logprobs is True
    assert engine_sampling(Sampling(max_tokens=1, logprobs=3)).logprobs == 3
    seeded = engine_sampling(Sampling(max_tokens=1, seed=-1, stop_token_ids=(4, 9),
                                      ignore_eos=True, top_k=5, top_p=0.5))
    assert seeded.seed == 2**64 - 1 and seeded.stop_token_ids == [4, 9]
    assert seeded.ignore_eos and seeded.top_k == 5 and seeded.top_p == 0.5
    seeded.validate()
