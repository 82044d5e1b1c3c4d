"""Continuous batching against full recompute, admission control, aborts."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams


def prompt(seed: int, n: int, vocab: int = 97) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(engine: Engine, arrivals: dict[int, list[Request]], max_steps: int = 500):
    """Step the engine, adding requests at their arrival step; tokens and events per request."""
    out: dict[str, list[int]] = {}
    events: dict[str, list] = {}
    step = 0
    while (engine.has_work() or any(s >= step for s in arrivals)) and step < max_steps:
        for req in arrivals.get(step, []):
            engine.add_request(req)
            out[req.request_id] = list(req.prompt_ids)
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
        step += 1
    assert not engine.has_work(), "engine did not finish"
    return out, events


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("speculative_tokens", [0, 1, 3])
def test_batched_decoding_matches_full_recompute(tiny_model, helpers, speculative_tokens):
    engine = Engine(
        tiny_model,
        EngineConfig(
            page_size=4,
            num_pages=96,
            max_num_seqs=8,
            max_batch_tokens=16,
            speculative_tokens=speculative_tokens,
        ),
    )
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    lengths = {"a": 5, "b": 37, "c": 1, "d": 22, "e": 11}
    arrivals = {
        0: [Request("a", prompt(1, 5), greedy(9)), Request("b", prompt(2, 37), greedy(7))],
        2: [Request("c", prompt(3, 1), greedy(12))],
        5: [Request("d", prompt(4, 22), greedy(8)), Request("e", prompt(5, 11), greedy(1))],
    }
    arrivals[0][1].sampling.logprobs = 3
    out, events = run(engine, arrivals)
    # Logprobs of the chosen token and the top 3, against the reference distribution.
    logp = torch.log_softmax(tiny_model(torch.tensor([out["b"]]))[0], dim=-1)
    for i, ev in enumerate(events["b"]):
        row = logp[37 + i - 1]
        assert abs(ev.logprob - float(row[ev.token_id])) < 1e-4
        top = torch.topk(row, 3)
        assert [t for t, _ in ev.top_logprobs] == top.indices.tolist()
        assert all(abs(lp - v) < 1e-4 for (_, lp), v in zip(ev.top_logprobs, top.values.tolist()))
    assert events["a"][0].logprob is None and events["a"][0].top_logprobs == []
    clear = 0
    for rid, tokens in out.items():
        n = lengths[rid]
        max_tokens = next(
            r.sampling.max_tokens for rs in arrivals.values() for r in rs if r.request_id == rid
        )
        assert len(tokens) == n + max_tokens
        assert events[rid][-1].finish_reason == "length"
        assert [e.num_generated for e in events[rid]] == list(range(1, max_tokens + 1))
        clear += helpers.check(tiny_model, recorder, rid, tokens, n)
    assert clear >= 30
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0
    assert stats.running == 0 and stats.waiting == 0
    assert stats.generation_tokens_total == 37
    assert stats.prompt_tokens_total == sum(lengths.values())
    assert stats.steps_total > 0 and stats.step_seconds_total.forward > 0
    assert stats.last_step.total > 0
    assert stats.requests_finished_total == {"length": 5}
    if speculative_tokens:
        assert stats.spec_draft_tokens_total > 0
        assert stats.spec_accepted_tokens_total <= stats.spec_draft_tokens_total


def test_full_cache_queues_and_abort_frees_everything(tiny_model):
    # Room for about two prompts at a time: the rest must queue, not fail.
    engine = Engine(
        tiny_model,
        EngineConfig(
            page_size=4,
            num_pages=42,
            num_slots=2,
            max_num_seqs=4,
            max_batch_tokens=64,
            max_model_len=150,
        ),
    )
    reqs = [Request(f"r{i}", prompt(10 + i, 30), greedy(4)) for i in range(5)]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    stats = engine.stats()
    assert stats.running == 2 and stats.waiting == 3
    assert stats.ssm_slot_usage == 1.0 and 0 < stats.kv_cache_usage <= 1.0
    assert engine.abort("r0") and engine.abort("r3")
    assert not engine.abort("nope")
    finished = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.finished:
                finished[ev.request_id] = ev.finish_reason
    assert finished == {
        "r0": "abort",
        "r3": "abort",
        "r1": "length",
        "r2": "length",
        "r4": "length",
    }
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0
    assert stats.requests_finished_total == {"abort": 2, "length": 3}


@pytest.mark.parametrize("k", [0, 2])
def test_preemption_recomputes_and_continues_identically(tiny_model, helpers, k):
    # Few pages: decodes run out of pages and the newest sequence is preempted, then recomputed.
    engine = Engine(
        tiny_model,
        EngineConfig(
            page_size=4,
            num_pages=36,
            max_num_seqs=4,
            max_batch_tokens=32,
            max_model_len=100,
            speculative_tokens=k,
        ),
    )
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    drafts = helpers.DraftRecorder(engine) if k else None
    arrivals = {0: [Request(f"p{i}", prompt(20 + i, 20), greedy(40)) for i in range(3)]}
    out, events = run(engine, arrivals)
    assert engine.stats().preemptions_total > 0
    if drafts is not None:
        # The MTP state of a preempted sequence is rebuilt along with the rest.
        assert drafts.check(tiny_model, out) > 0
    for rid, tokens in out.items():
        assert len(tokens) == 60
        assert [e.num_generated for e in events[rid]] == list(range(1, 41))
        helpers.check(tiny_model, recorder, rid, tokens, 20)


def test_bad_requests_get_clear_errors(tiny_model):
    engine = Engine(tiny_model, EngineConfig(page_size=4, num_pages=64, max_model_len=50))
    with pytest.raises(ValueError, match="max_model_len=50"):
        engine.add_request(Request("long", prompt(0, 50), greedy(1)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("empty", [], greedy(1)))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        engine.add_request(Request("vocab", [5, 97], greedy(1)))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(Request("neg", [5], SamplingParams(max_tokens=-1)))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(Request("stop", [5], SamplingParams(stop=["x"])))
    engine.add_request(Request("ok", [5], greedy(1)))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(Request("ok", [6], greedy(1)))
    with pytest.raises(ValueError, match="speculative_tokens"):
        Engine(helpers_model_without_mtp(), EngineConfig(num_pages=64, speculative_tokens=2))
    with pytest.raises(ValueError, match="num_pages"):
        Engine(tiny_model, EngineConfig(page_size=4, num_pages=8, max_model_len=50))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EngineConfig(num_pages=8, max_batch_tokens=0).validate()
    with pytest.raises(ValueError, match="num_pages or cache_memory_bytes"):
        EngineConfig().validate()


def helpers_model_without_mtp():
    from baton.workers.model import NemotronHConfig, NemotronHModel

    from_dict = NemotronHConfig.from_dict
    config = from_dict(
        {
            "vocab_size": 97,
            "hidden_size": 16,
            "hybrid_override_pattern": "M*",
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "mamba_num_heads": 2,
            "mamba_head_dim": 8,
            "ssm_state_size": 4,
            "n_groups": 1,
            "max_position_embeddings": 64,
        }
    )
    return NemotronHModel(config, dtype=torch.float32)


def test_memory_budget_sizes_the_caches(tiny_model):
    probe = tiny_model.allocate_cache(1, 4, 1)
    per_page, per_slot = probe.bytes_per_page(), probe.bytes_per_slot()
    per_snapshot = probe.bytes_per_snapshot(tiny_model.config.hidden_size)
    budget = 8 * per_slot + 100 * per_page
    sized = dict(page_size=4, cache_memory_bytes=budget, max_num_seqs=8, max_model_len=100)
    stats = Engine(tiny_model, EngineConfig(**sized, prefix_cache=False)).stats()
    assert stats.num_slots == 8 and stats.num_pages == 100 and stats.num_snapshots == 0
    # The prefix cache's snapshots take their share of the budget first.
    stats = Engine(tiny_model, EngineConfig(**sized, snapshot_memory_fraction=0.2)).stats()
    snapshots = int(budget * 0.2) // per_snapshot
    assert stats.num_snapshots == snapshots > 0
    assert stats.num_pages == (budget - 8 * per_slot - snapshots * per_snapshot) // per_page
    with pytest.raises(ValueError, match="cache_memory_bytes"):
        Engine(tiny_model, EngineConfig(page_size=4, cache_memory_bytes=10, max_num_seqs=8))
    with pytest.raises(ValueError, match="snapshot_memory_fraction: 0.001 of .* less than one"):
        Engine(tiny_model, EngineConfig(**sized, snapshot_memory_fraction=0.001))
    with pytest.raises(ValueError, match="snapshot_interval=6 is invalid: a multiple of"):
        Engine(tiny_model, EngineConfig(**sized, snapshot_interval=6))


def test_eos_and_stop_token_ids_finish_with_stop(tiny_model):
    engine = Engine(tiny_model, EngineConfig(page_size=4, num_pages=64, max_model_len=100))
    # Find what greedy decoding produces, then make its third token a stop token.
    out, _ = run(engine, {0: [Request("probe", prompt(7, 6), greedy(5))]})
    tokens = out["probe"][6:]
    stop_at = tokens[2]
    first = tokens.index(stop_at)
    _, events = run(
        engine,
        {
            0: [
                Request(
                    "s",
                    prompt(7, 6),
                    SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[stop_at]),
                )
            ]
        },
    )
    assert [e.token_id for e in events["s"]] == tokens[: first + 1]
    assert events["s"][-1].finish_reason == "stop"
    # The model's eos ends a request unless ignore_eos.
    eos_engine = Engine(
        tiny_model,
        EngineConfig(page_size=4, num_pages=64, max_model_len=100, eos_token_ids=[stop_at]),
    )
    _, events = run(
        eos_engine, {0: [Request("e", prompt(7, 6), SamplingParams(max_tokens=5, temperature=0))]}
    )
    assert events["e"][-1].finish_reason == "stop" and len(events["e"]) == first + 1
    _, events = run(eos_engine, {0: [Request("i", prompt(7, 6), greedy(5))]})
    assert len(events["i"]) == 5


@pytest.mark.parametrize("k", [0, 2])
def test_small_token_budget_starves_nobody(tiny_model, helpers, k):
    # 4 running sequences, 3 tokens per step: decodes take turns, drafts shrink to fit.
    engine = Engine(
        tiny_model,
        EngineConfig(
            page_size=4, num_pages=96, max_num_seqs=4, max_batch_tokens=3, speculative_tokens=k
        ),
    )
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    requests = [Request(f"s{i}", prompt(50 + i, 3 + i), greedy(6)) for i in range(4)]
    out, events = run(engine, {0: requests})
    for r in requests:
        assert len(out[r.request_id]) == len(r.prompt_ids) + 6
        helpers.check(tiny_model, recorder, r.request_id, out[r.request_id], len(r.prompt_ids))


@pytest.mark.gpu
def test_engine_on_cuda_matches_full_recompute(tmp_path, helpers):
    from baton.workers.model import load_model
    from baton.workers.model.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(
        tmp_path, helpers.TINY, seed=0, dtype=torch.float32, tokenizer=False
    )
    model = load_model(path, dtype=torch.float32, device="cuda", kernels="torch")
    engine = Engine(
        model, EngineConfig(page_size=16, num_pages=64, max_batch_tokens=32, speculative_tokens=2)
    )
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    requests = [Request(f"g{i}", prompt(60 + i, 9 + 13 * i), greedy(8)) for i in range(3)]
    out, _ = run(engine, {0: requests})
    for r in requests:
        helpers.check(model, recorder, r.request_id, out[r.request_id], len(r.prompt_ids))


def test_unseeded_requests_follow_the_engine_base_seed(tiny_model):
    def sample(base_seed):
        engine = Engine(tiny_model, EngineConfig(page_size=4, num_pages=64, base_seed=base_seed))
        req = Request(
            "u", prompt(9, 8), SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
        )
        out, _ = run(engine, {0: [req]})
        return out["u"]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    with pytest.raises(ValueError, match="base_seed"):
        EngineConfig(num_pages=8, base_seed=-1).validate()


@pytest.mark.parametrize("k", [0, 3])
def test_output_stops_at_max_model_len(tiny_model, k):
    engine = Engine(
        tiny_model, EngineConfig(page_size=4, num_pages=64, max_model_len=50, speculative_tokens=k)
    )
    out, events = run(engine, {0: [Request("edge", prompt(3, 45), greedy(100))]})
    assert len(out["edge"]) == 50
    assert [e.finish_reason for e in events["edge"]] == [None] * 4 + ["length"]
    assert engine.stats().kv_cache_usage == 0


@pytest.mark.parametrize("pattern", ["M-M", "*E*"])
def test_pure_mamba_and_pure_attention_models(tmp_path, helpers, pattern):
    from baton.workers.model import load_model
    from baton.workers.model.checkpoint import write_random_checkpoint

    config = {**helpers.TINY, "hybrid_override_pattern": pattern, "num_nextn_predict_layers": 0}
    config.pop("mtp_hybrid_override_pattern")
    path = write_random_checkpoint(tmp_path, config, seed=1, dtype=torch.float32, tokenizer=False)
    model = load_model(path, dtype=torch.float32, kernels="torch")
    engine = Engine(model, EngineConfig(page_size=4, num_pages=64, max_batch_tokens=8))
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    requests = [Request(f"m{i}", prompt(90 + i, 5 + 9 * i), greedy(6)) for i in range(3)]
    out, _ = run(engine, {0: requests[:2], 3: requests[2:]})
    for r in requests:
        helpers.check(model, recorder, r.request_id, out[r.request_id], len(r.prompt_ids))
    # The handoff carries only what the layers have, and the last hidden state (which the
    # decode engine's snapshot of the prompt keeps).
    p, d = (Engine(model, EngineConfig(page_size=4, num_pages=64)) for _ in range(2))
    request = Request("h", prompt(99, 14), greedy(5))
    res = d.reserve(request)
    res.bind(res.token, res.chain_hash)
    kinds = []

    class Sink:
        def on_layer(self, state):
            kinds.append(state.kind.value)
            res.write(state)

    result = p.prefill(request, Sink())
    res.commit(result.first_token, request.sampling)
    assert set(kinds) == ({"conv", "ssm"} if pattern == "M-M" else {"kv"}) | {"hidden"}
    while d.has_work():
        d.step()
