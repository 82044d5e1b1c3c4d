"""The end-to-end benchmark runs on a tiny model on the CPU with real processes (`baton up`
for the disaggregated mode, the aggregated server), so the GPU run does not find a broken
script; the load generator's schedule and percentiles are checked on their own."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import sys
import time
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
        # uniform, 1.5 s: long at 0.5 s, short at 0.25, 0.75, 1.25 s; none failed or cut off
        assert cells[3:6] == ["1 + 3", "0", "0"], row
        ttft = [float(c) for c in cells[6:9]]
        itl = [float(c) for c in cells[11:14]]
        assert 0 < ttft[0] <= ttft[1] <= ttft[2] and 0 <= itl[0] <= itl[1] <= itl[2], row
    assert "FAILED" not in text and "MPS: not applicable" in text
    figures = json.loads(report.with_suffix(".json").read_text())
    assert [r["mode"] for r in figures["runs"]] == ["disagg", "agg"]
    assert all(r["failed"] == 0 and r["output_tokens_per_s"] > 0 for r in figures["runs"])
    # fp32 on the CPU: the aggregated engine streams the tokens the disaggregated path does.
    assert figures["agreement"] == {"agg": {"reference": "disagg", "agree": 6, "compared": 6}}
    assert "agg 6/6 as disagg" in text


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
    cut = loadgen.Outcome("short", sent_at=10.0, error=loadgen.CUT_OFF)
    s = loadgen.summarize("agg", 1.0, [ok, slow, failed, cut], wall_s=2.0)
    assert s.sent == {"long": 2, "short": 2} and s.failed == 1 and s.cut_off == 1
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


async def test_run_load_reads_sse_chunks_and_cuts_off_stragglers(bench):
    """Against a fake OpenAI server: token counts come from the chunks' logprobs (two tokens
    in one chunk count twice), HTTP and stream errors are reported, and a request that never
    finishes is cut off after the drain time instead of holding the run."""
    import loadgen
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        kind = {3: "burst", 4: "error", 5: "hang"}.get(len(body["prompt"]), "ok")
        if kind == "error":
            return web.json_response({"error": {"message": "bad"}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(tokens: int) -> None:
            assert body["return_tokens_as_token_ids"] is True
            chunk = {"choices": [{"text": "x", "logprobs": {"tokens": ["token_id:7"] * tokens}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if kind == "hang":
            await send(1)
            # Until the client goes away: a cut-off request must close its stream.
            for _ in range(3000):
                if request.transport is None or request.transport.is_closing():
                    disconnected.set()
                    return response
                await asyncio.sleep(0.02)  # a bounded poll for the client going away
        await send(1)
        await asyncio.sleep(0.05)  # paces the fake server's tokens: a gap to measure
        await send(2 if kind == "burst" else 1)
        if kind != "burst":
            await send(1)
        await response.write(b"data: [DONE]\n\n")
        return response

    disconnected = asyncio.Event()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        arrivals = [loadgen.Arrival(0.0, "short", (7, 8)), loadgen.Arrival(0.0, "short", (7,) * 3),
                    loadgen.Arrival(0.1, "long", (7,) * 4), loadgen.Arrival(0.1, "long", (7,) * 5)]
        outcomes, wall = await loadgen.run_load(f"http://127.0.0.1:{port}/v1", "m", arrivals,
                                                output_len=3, timeout_s=600, drain_s=1.0)
        # The hanging request did not hold the run: the drain cut it off (asserted below as
        # its outcome) and closed its stream.
        await asyncio.wait_for(disconnected.wait(), 60)
    finally:
        await runner.cleanup()
    ok, burst, error, hang = outcomes
    # Chunk arrival times depend on scheduling; only their order is certain.
    assert ok.error is None and len(ok.token_times) == 3 and min(ok.gaps()) >= 0
    assert ok.token_ids == [7, 7, 7] and ok.margins == []
    assert burst.error is None and burst.gaps()[1] == 0.0
    assert error.error.startswith("HTTP 400")
    assert hang.error == loadgen.CUT_OFF
    s = loadgen.summarize("x", 1.0, outcomes, wall)
    assert (s.failed, s.cut_off) == (1, 1)


def test_greedy_agreement_allows_parting_only_at_near_ties(bench):
    import loadgen

    def run(ids, margins):
        return loadgen.Outcome("short", 0.0, token_ids=ids, margins=margins)

    ref = [run([1, 2, 3], [0.5, 0.5, 0.5]), run([4, 5, 6], [0.5, 1e-4, 0.5]),
           run([7, 8, 9], [0.5, 0.5, 0.5]), run([1], [0.5])]
    other = [run([1, 2, 3], [0.5, 0.5, 0.5]),   # equal
             run([4, 9, 9], [0.5, 0.5, 0.5]),   # parts at the reference's near-tie: fine
             run([7, 0, 9], [0.5, 0.5, 0.5]),   # parts with a clear margin: disagrees
             loadgen.Outcome("short", 0.0, error="HTTP 500")]  # not compared
    assert loadgen.greedy_agreement(ref, other, 1e-3) == (2, 3)
    # Without margins every difference counts; a shorter output disagrees.
    assert loadgen.greedy_agreement([run([1, 2], [])], [run([1, 3], [])], 1e-3) == (0, 1)
    assert loadgen.greedy_agreement([run([1, 2], [])], [run([1], [])], 1e-3) == (0, 1)


async def test_engine_backend_streams_and_frees_a_closed_request(bench, tmp_path):
    """The aggregated baseline's backend: tokens as the engine makes them, and a stream
    closed early (a client gone) aborts the request, freeing its slot."""
    import torch
    from aggregated import EngineBackend
    from shapes import SMOKE

    from baton.workers.engine import Engine, EngineConfig, EngineLoop
    from baton.workers.model import load_model
    from baton.workers.model.checkpoint import write_random_checkpoint
    from baton.workers.router.backend import GenerationRequest
    from baton.workers.sampling_params import SamplingParams

    path = write_random_checkpoint(tmp_path / "ckpt", SMOKE, dtype=torch.float32,
                                   tokenizer=False)
    model = load_model(path, dtype=torch.float32, kernels="torch")
    loop = EngineLoop(Engine(model, EngineConfig(num_pages=64, max_num_seqs=2,
                                                 max_model_len=256, base_seed=0)))
    try:
        backend = EngineBackend(loop)
        backend.check_ready()

        def request(rid: str, n: int) -> GenerationRequest:
            return GenerationRequest(rid, tuple(range(5, 17)), SamplingParams(
                max_tokens=n, temperature=0.0, ignore_eos=True), deadline=time.time() + 60)

        outs = [o async for o in backend.generate(request("full", 4))]
        assert len(outs) == 4 and all(o.token_id is not None for o in outs)
        assert [o.finish_reason for o in outs] == [None, None, None, "length"]

        stream = backend.generate(request("gone", 200))
        first = await stream.__anext__()
        assert first.token_id == outs[0].token_id  # same prompt, greedy
        await stream.aclose()
        deadline = time.monotonic() + 60
        while (loop.stats().running or loop.engine.has_work()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # a bounded poll for the asserted state
        stats = loop.stats()
        assert stats.running == 0 and stats.free_slots == 2
        assert stats.requests_finished_total.get("abort") == 1  # not run to its 200 tokens
    finally:
        loop.stop()
