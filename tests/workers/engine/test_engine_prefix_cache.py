"""The hybrid prefix cache: a request served from a hit equals the same request with the cache
off (teacher-forced fp32 logits within 1e-4, equal greedy tokens where the margin is clear;
DESIGN.md, Seams: Tests), on one engine, on either side of a handoff, and through a local
prefill; with MTP speculation on; with hits inside a page, on a page boundary and at a snapshot
inside a long prompt; and nothing leaks or is served from an evicted snapshot under pressure."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import (
    Engine,
    EngineConfig,
    LayerState,
    Request,
    SamplingParams,
    StateKind,
)
from baton.workers.engine import prefix_cache as prefix_module

PAGE = 4
INTERVAL = 8


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_for(model, k: int = 0, prefix: bool = True, **kw) -> Engine:
    config = {
        "page_size": PAGE,
        "num_pages": 200,
        "max_num_seqs": 8,
        "max_batch_tokens": 12,
        "speculative_tokens": k,
        "prefix_cache": prefix,
        "snapshot_interval": INTERVAL,
        **kw,
    }
    return Engine(model, EngineConfig(**config))


def serve(engine: Engine, request: Request) -> list[int]:
    """Runs one request to its end (alone: a turn of a session)."""
    engine.add_request(Request(request.request_id, list(request.prompt_ids), request.sampling,
                               snapshot_points=request.snapshot_points))
    out = []
    while engine.has_work():
        out += [e.token_id for e in engine.step() if e.request_id == request.request_id]
    return out


def idle_and_accounted(engine: Engine) -> dict[str, int]:
    """Nothing is held by a sequence; every page and snapshot is where the cache says."""
    counts = engine.prefix.audit()
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0 and not engine.has_work()
    # The only held pages are the snapshots' frozen tail copies.
    assert counts["held"] == counts["snapshots"] == stats.snapshots
    return counts


class Session:
    """A chat whose every turn resends the history (prompt + answer) and appends a message."""

    def __init__(self, seed: int, first: int, grow: list[int], answer: int = 5):
        self.seed, self.first, self.grow, self.answer = seed, first, grow, answer

    def turns(self, answers: list[list[int]]):
        history = prompt(self.seed, self.first)
        for t in range(len(self.grow) + 1):
            yield history
            if t == len(self.grow):
                return
            history = history + answers[t] + prompt(self.seed * 100 + t, self.grow[t])


def run_session(engine, session: Session, name: str, drafts=None) -> tuple[list, list]:
    """Each turn's (prompt, answer) and the tokens its admission took from the cache."""
    turns, cached, answers = [], [], []
    for t, ids in enumerate(session.turns(answers)):
        before = engine.stats().prefix_hit_tokens_total
        out = serve(engine, Request(f"{name}-t{t}", ids, greedy(session.answer)))
        cached.append(engine.stats().prefix_hit_tokens_total - before)
        answers.append(out)
        turns.append((ids, out))
    return turns, cached


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize(
    "first",
    [
        pytest.param(20, id="hit-on-a-page-boundary"),  # 20 + 5 - 1 = 24 = 6 pages
        pytest.param(22, id="hit-inside-a-page"),  # 26: two tokens into page 7
    ],
)
def test_multi_turn_hits_equal_the_cache_off_run(tiny_model, helpers, k, first):
    session = Session(1, first, [6, 9])
    engine = engine_for(tiny_model, k)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    drafts = helpers.DraftRecorder(engine) if k else None
    turns, cached = run_session(engine, session, "s")
    cold = engine_for(tiny_model, k, prefix=False)
    cold_turns, _ = run_session(cold, session, "s")
    assert turns == cold_turns
    for t, (ids, out) in enumerate(turns):
        helpers.check(tiny_model, recorder, f"s-t{t}", ids + out, len(ids))
    # From turn 2 on, the whole previous turn but its last sampled token came from the cache
    # (all of it when a speculative step had fed that token too).
    assert cached[0] == 0
    for t in (1, 2):
        previous = len(turns[t - 1][0]) + len(turns[t - 1][1])
        assert cached[t] in (previous - 1, previous)
    if k:
        tokens = {f"s-t{t}": ids + out for t, (ids, out) in enumerate(turns)}
        assert drafts.check(tiny_model, tokens) > 0  # MTP state rebuilt after each hit
    # Only the new tokens were computed (plus each turn's decode steps).
    computed = engine.stats().prompt_tokens_total
    new_tokens = sum(len(ids) for ids, _ in turns) - sum(cached)
    assert computed == new_tokens
    idle_and_accounted(engine)


@pytest.mark.parametrize("k", [0, 2])
def test_hit_at_a_snapshot_inside_a_long_prompt(tiny_model, helpers, k):
    """A long shared prefix (a system prompt, a document) hits at the last multiple of the
    snapshot interval before the first differing token, even in one big chunk."""
    engine = engine_for(tiny_model, k, max_batch_tokens=64)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    shared = prompt(5, 19)
    a = Request("a", shared + prompt(6, 11), greedy(4))
    b = Request("b", shared + prompt(7, 9), greedy(4))
    chunks = []
    forward = tiny_model.forward_batch
    try:
        tiny_model.forward_batch = lambda batch, *a_, **kw: (
            chunks.append(list(batch.seq_lens)) or forward(batch, *a_, **kw)
        )
        out_a = serve(engine, a)
    finally:
        del tiny_model.forward_batch
    # The 30-token prompt ran in chunks ending on multiples of 8 (one snapshot each).
    assert chunks[:4] == [[8], [8], [8], [6]]
    before = engine.stats().prefix_hit_tokens_total
    out_b = serve(engine, b)
    assert engine.stats().prefix_hit_tokens_total - before == 16
    for r, out in ((a, out_a), (b, out_b)):
        helpers.check(tiny_model, recorder, r.request_id, r.prompt_ids + out, len(r.prompt_ids))
    cold = engine_for(tiny_model, k, prefix=False, max_batch_tokens=64)
    assert [serve(cold, a), serve(cold, b)] == [out_a, out_b]
    idle_and_accounted(engine)


def test_whole_prompt_hit_samples_without_a_forward(tiny_model, helpers):
    """The same prompt again (the router's n > 1 choices, a retry): no prompt token is
    computed, and seeded sampling still draws what a cold engine draws for each seed."""
    engine = engine_for(tiny_model, k=2)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    ids = prompt(8, 17)
    first = serve(engine, Request("c0", ids, greedy(6)))
    computed = engine.stats().prompt_tokens_total
    forwards = []
    forward = tiny_model.forward_batch
    try:
        tiny_model.forward_batch = lambda batch, *a, **kw: (
            forwards.append(sum(batch.seq_lens)) or forward(batch, *a, **kw)
        )
        again = serve(engine, Request("c1", ids, greedy(6)))
    finally:
        del tiny_model.forward_batch
    assert again == first and engine.stats().prompt_tokens_total == computed
    assert all(n <= 3 for n in forwards)  # only decode / verify steps ran
    helpers.check(tiny_model, recorder, "c1", ids + again, len(ids))
    cold = engine_for(tiny_model, prefix=False)
    for seed in (1, 2, 3):
        sampling = SamplingParams(max_tokens=5, temperature=0.9, seed=seed, ignore_eos=True)
        hot = serve(engine, Request(f"n{seed}", ids, sampling))
        assert hot == serve(cold, Request(f"n{seed}", ids, sampling))
    idle_and_accounted(engine)


def test_a_rerendered_history_hits_before_its_first_difference(tiny_model, helpers):
    """A template that strips earlier reasoning (or text that re-tokenizes differently)
    changes the history inside the previous answer: the hit falls back to the snapshot at the
    previous prompt's end; a change inside the prompt falls back to an interval snapshot."""
    engine = engine_for(tiny_model, k=2)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    turn1 = prompt(9, 21)
    answer = serve(engine, Request("t1", turn1, greedy(6)))
    rerendered = turn1 + [(answer[0] + 1) % 97 or 3] + answer[1:] + prompt(10, 5)
    before = engine.stats().prefix_hit_tokens_total
    out = serve(engine, Request("t2", rerendered, greedy(4)))
    assert engine.stats().prefix_hit_tokens_total - before == 21  # the prompt-end snapshot
    helpers.check(tiny_model, recorder, "t2", rerendered + out, len(rerendered))
    edited = turn1[:18] + [(turn1[18] + 1) % 97 or 3] + turn1[19:]
    before = engine.stats().prefix_hit_tokens_total
    out = serve(engine, Request("t3", edited, greedy(4)))
    assert engine.stats().prefix_hit_tokens_total - before == 16  # the interval snapshot
    helpers.check(tiny_model, recorder, "t3", edited + out, len(edited))
    idle_and_accounted(engine)


def test_divergent_continuations_of_one_page_each_keep_their_mtp_entries(tiny_model, helpers):
    """Two answers to one prompt that ends on a page boundary part at the first token after
    it, so that page's last MTP entry differs (it pairs with the next token): each answer's
    next turn passes through its own variant of the page and drafts exactly."""
    engine = engine_for(tiny_model, k=2, num_snapshots=32)
    drafts = helpers.DraftRecorder(engine)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    ids = prompt(11, 16)
    answers = {}
    for seed in range(8):
        sampling = SamplingParams(max_tokens=6, temperature=1.5, seed=seed, ignore_eos=True)
        answers[seed] = serve(engine, Request(f"a{seed}", ids, sampling))
        if len({a[0] for a in answers.values()}) == 2:
            break
    assert len({a[0] for a in answers.values()}) == 2, answers
    drafts.drafts.clear()  # the reference chains argmax drafts: check the greedy turns only
    tokens = {}
    for seed, answer in answers.items():
        history = ids + answer + prompt(12 + seed, 5)
        before = engine.stats().prefix_hit_tokens_total
        out = serve(engine, Request(f"n{seed}", history, greedy(4)))
        # The whole answer but (unless a speculative step fed it) its last token.
        assert engine.stats().prefix_hit_tokens_total - before in (len(ids) + 5, len(ids) + 6)
        helpers.check(tiny_model, recorder, f"n{seed}", history + out, len(history))
        tokens[f"n{seed}"] = history + out
    assert drafts.check(tiny_model, tokens) > 0
    idle_and_accounted(engine)


# ---- across P/D ---------------------------------------------------------------------------


class ForwardingSink:
    def __init__(self, reservation) -> None:
        self.reservation = reservation
        self.states: list[LayerState] = []

    def on_layer(self, state: LayerState) -> None:
        self.states.append(state)
        self.reservation.write(state)


def drain(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                out.setdefault(ev.request_id, []).append(ev.token_id)
    return out


def handoff(p: Engine, d: Engine, request: Request, local_max: int = 0):
    """Reserve on D (which pins its hit), prefill the rest on P from P's own hit, decode on D.
    Returns (tokens, D's cached tokens, P's cached tokens or None, the states P sent)."""
    res = d.reserve(request, local_max)
    if res.local_prefill:
        return drain(d)[request.request_id], res.cached_tokens, None, []
    res.bind(res.token, res.chain_hash)
    sink = ForwardingSink(res)
    result = p.prefill(request, sink, sink_from=res.cached_tokens)
    res.commit(result.first_token, request.sampling, result.logprob, result.top_logprobs)
    return drain(d)[request.request_id], res.cached_tokens, result.cached_tokens, sink.states


@pytest.mark.parametrize("k", [0, 2])
def test_handoff_with_hits_on_both_sides_and_local_prefill(tiny_model, helpers, k):
    p, d = engine_for(tiny_model), engine_for(tiny_model, k)
    recorder = helpers.Recorder()
    p.runner.logits_observer = recorder
    d.runner.logits_observer = recorder
    drafts = helpers.DraftRecorder(d) if k else None
    single = engine_for(tiny_model, k, prefix=False)
    session = Session(13, 23, [9, 13, 3])
    answers: list[list[int]] = []
    seen = []
    for t, ids in enumerate(session.turns(answers)):
        # Turn 3 (13 new tokens) is prefilled remotely; turn 4 (3 + the answer) locally.
        request = Request(f"h{t}", ids, greedy(5))
        out, d_cached, p_cached, states = handoff(p, d, request, local_max=8)
        answers.append(out)
        assert out == serve(single, request)
        helpers.check(tiny_model, recorder, f"h{t}", ids + out, len(ids))
        seen.append((len(ids), d_cached, p_cached))
        if p_cached is not None:
            # Only what D lacked travelled: KV from D's hit, MTP entries from one before it.
            for s in states:
                if s.kind == StateKind.KV:
                    assert s.token_start >= d_cached
                if s.kind == StateKind.MTP_KV:
                    assert s.token_start >= max(d_cached - 1, 0)
    prev_total = [n + 5 for n, _, _ in seen]
    # Turn 1: cold on both sides. Turn 2: D holds turn 1 but its last token, P its prompt.
    assert seen[0][1:] == (0, 0)
    assert seen[1][1] == prev_total[0] - 1 and seen[1][2] == seen[0][0]
    assert seen[2][1] == prev_total[1] - 1 and seen[2][2] == seen[1][0]
    # Turn 4 was prefilled by D alone.
    assert seen[3][1] == prev_total[2] - 1 and seen[3][2] is None
    assert d.stats().local_prefills_total == 1
    if k:
        tokens = {f"h{t}": ids + out for t, (ids, out) in enumerate(
            zip(session.turns(answers), answers))}
        assert drafts.check(tiny_model, tokens) > 0
    for engine in (p, d):
        idle_and_accounted(engine)


def test_prefill_side_hit_sends_its_cached_part_from_the_cache(tiny_model, helpers):
    """P's hit covers more than D holds: the KV of [D's hit, P's hit) is read from P's cache,
    the rest computed; and a whole-prompt hit on P sends everything without a forward."""
    p, d = engine_for(tiny_model), engine_for(tiny_model, 2)
    recorder = helpers.Recorder()
    shared = prompt(14, 18)
    warm = Request("warm", shared, greedy(3))
    p.prefill(warm, _Drop())  # P alone saw this prompt (another decode worker got it)
    p.runner.logits_observer = d.runner.logits_observer = recorder
    for rid, ids in (("more", shared + prompt(15, 6)), ("same", shared)):
        request = Request(rid, ids, greedy(5))
        out, d_cached, p_cached, states = handoff(p, d, request)
        assert d_cached == 0 and p_cached == 18
        kv = sorted((s.token_start, s.token_end) for s in states if s.layer == 1)
        assert kv[0] == (0, 18) and kv[-1][1] == len(ids)  # the cached part in one piece
        helpers.check(tiny_model, recorder, rid, ids + out, len(ids))
        assert out == serve(engine_for(tiny_model, prefix=False), request)
        d.prefix.audit()
        d = engine_for(tiny_model, 2)  # a fresh D: it holds nothing of the next one either
        d.runner.logits_observer = recorder
    idle_and_accounted(p)


class _Drop:
    def on_layer(self, state) -> None:
        pass


# ---- pressure and collisions --------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 2])
def test_pressure_evicts_leaks_nothing_and_serves_nothing_stale(tiny_model, helpers, k):
    """More sessions than the snapshot pool holds, interleaved, in few pages: snapshots and
    pages are evicted, every turn still equals its recompute, and afterwards every page,
    slot and snapshot is accounted for."""
    engine = engine_for(tiny_model, k, num_pages=30, num_snapshots=5, max_model_len=100,
                        snapshot_interval=0)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    sessions = [Session(20 + i, 9 + 3 * i, [4, 6]) for i in range(5)]
    answers: dict[int, list] = {i: [] for i in range(5)}
    generators = {i: s.turns(answers[i]) for i, s in enumerate(sessions)}
    hits = {i: 0 for i in range(5)}
    # Session 0 is hot (every other request); the others come round in turn and find their
    # snapshots evicted by the time they do.
    order = [0, 1, 0, 2, 0, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    for n, i in enumerate(order):
        ids = next(generators[i])
        before = engine.stats().prefix_hit_tokens_total
        out = serve(engine, Request(f"p{n}", ids, greedy(4)))
        hits[i] += engine.stats().prefix_hit_tokens_total > before
        answers[i].append(out)
        helpers.check(tiny_model, recorder, f"p{n}", ids + out, len(ids))
        counts = idle_and_accounted(engine)
        assert counts["snapshots"] <= 5
    stats = engine.stats()
    assert stats.snapshot_evictions_total > 10 and stats.page_evictions_total > 0
    assert hits[0] == 2 and sum(hits.values()) < 10


def test_a_hash_collision_costs_a_miss_never_wrong_state(tiny_model, helpers, monkeypatch):
    """Every page of every prefix gets the same chain key: the trie still tells prefixes
    apart by their parent and tokens, so a colliding page is simply not published (its chain
    stays private past it) and every hit is exact."""
    monkeypatch.setattr(prefix_module, "page_key", lambda parent, tokens: 7)
    engine = engine_for(tiny_model)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    a = prompt(30, 14)
    b = a[:5] + prompt(31, 9)  # shares a's first page; its second collides with a's
    for rid, ids in (("a", a), ("b", b), ("a2", a + prompt(32, 3)), ("b2", b)):
        before = engine.stats().prefix_hit_tokens_total
        out = serve(engine, Request(rid, ids, greedy(4)))
        hit = engine.stats().prefix_hit_tokens_total - before
        helpers.check(tiny_model, recorder, rid, ids + out, len(ids))
        # a2 extends a's prompt: a's prompt-end snapshot. b2 repeats b, whose chain left the
        # trie at its colliding second page: its snapshot at 8 sits on the first page.
        assert hit == {"a": 0, "b": 0, "a2": 14, "b2": 8}[rid], (rid, hit)
    idle_and_accounted(engine)


@pytest.mark.parametrize("k", [0, 2])
def test_preemption_with_the_cache_stays_exact_and_accounted(tiny_model, helpers, k):
    """A preempted sequence's pages go to the cache's LRU (the page pressure that preempted
    it usually takes them next); it is recomputed, through whatever survived."""
    engine = engine_for(tiny_model, k, num_pages=40, max_model_len=100, max_batch_tokens=24)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    requests = [Request(f"r{i}", prompt(40 + i, 20 + 5 * i), greedy(40)) for i in range(3)]
    for r in requests:
        engine.add_request(r)
    out = drain(engine)
    assert engine.stats().preemptions_total > 0
    for r in requests:
        helpers.check(tiny_model, recorder, r.request_id, r.prompt_ids + out[r.request_id],
                      len(r.prompt_ids))
    idle_and_accounted(engine)


# ---- snapshot points (the router's chat message boundaries) ------------------------------


def points_engine(model, k: int = 0, prefix: bool = True) -> Engine:
    """No interval snapshots, chunks large enough for a whole prompt: the points alone make
    the hits."""
    return engine_for(model, k, prefix, snapshot_interval=0, max_batch_tokens=64)


# Turn 1: [system+user: 13][generation prompt: 3]; turn 2 re-renders the generation prompt
# and the answer (`<think>\n` -> `<think></think>`) and adds a tool result.
POINT_HISTORY = prompt(1, 13)
TURN1 = Request("t1", POINT_HISTORY + prompt(2, 3), greedy(4), snapshot_points=(13,))
TURN2 = Request("t2", POINT_HISTORY + prompt(3, 9), greedy(4), snapshot_points=(13, 20))


@pytest.mark.parametrize("k", [0, 2])
def test_a_hit_at_a_snapshot_point_equals_the_cache_off_run(tiny_model, helpers, k):
    engine = points_engine(tiny_model, k)
    recorder = helpers.Recorder()
    engine.runner.logits_observer = recorder
    chunks = []
    forward = tiny_model.forward_batch
    try:
        tiny_model.forward_batch = lambda batch, *a, **kw: (
            chunks.append(list(batch.seq_lens)) or forward(batch, *a, **kw))
        out1 = serve(engine, TURN1)
    finally:
        del tiny_model.forward_batch
    assert chunks[:2] == [[13], [3]]  # the prompt's chunk ended at the point
    before = engine.stats().prefix_hit_tokens_total
    out2 = serve(engine, TURN2)
    assert engine.stats().prefix_hit_tokens_total - before == 13
    for r, out in ((TURN1, out1), (TURN2, out2)):
        helpers.check(tiny_model, recorder, r.request_id, r.prompt_ids + out,
                      len(r.prompt_ids))
    cold = points_engine(tiny_model, k, prefix=False)
    assert [serve(cold, TURN1), serve(cold, TURN2)] == [out1, out2]
    # Without the point, turn 2 would have found nothing.
    plain = points_engine(tiny_model, k)
    serve(plain, Request("p1", TURN1.prompt_ids, greedy(4)))
    before = plain.stats().prefix_hit_tokens_total
    serve(plain, Request("p2", TURN2.prompt_ids, greedy(4)))
    assert plain.stats().prefix_hit_tokens_total == before


@pytest.mark.parametrize("k", [0, 2])
def test_snapshot_points_on_the_prefill_side_and_in_a_local_prefill(tiny_model, helpers, k):
    cold = points_engine(tiny_model, k, prefix=False)
    expected = [serve(cold, TURN1), serve(cold, TURN2)]
    # Prefill side: P snapshots at the point while it prefills turn 1 for D.
    p, d = points_engine(tiny_model), points_engine(tiny_model, k)
    recorder = helpers.Recorder()
    p.runner.logits_observer = recorder
    d.runner.logits_observer = recorder

    def transferred(request: Request) -> tuple[list[int], int]:
        tokens, _, p_cached, _ = handoff(p, d, request)
        return tokens, p_cached

    got, cached = zip(*(transferred(r) for r in (TURN1, TURN2)))
    assert list(got) == expected and cached == (0, 13)
    helpers.check(tiny_model, recorder, "t2", TURN2.prompt_ids + got[1], len(TURN2.prompt_ids))
    # Decode side: D holds a shorter prefix (a first turn it decoded), so it prefills turns 1
    # and 2 itself, and snapshots at the point in turn 1's local prefill.
    p, d = points_engine(tiny_model), points_engine(tiny_model, k)
    d.runner.logits_observer = recorder = helpers.Recorder()
    handoff(p, d, Request("t0", POINT_HISTORY[:8], greedy(2)))
    got, cached = [], []
    for request in (TURN1, TURN2):
        res = d.reserve(request, 64)
        assert res.local_prefill
        cached.append(res.cached_tokens)
        got.append(drain(d)[request.request_id])
    assert got == expected and cached == [8, 13]
    helpers.check(tiny_model, recorder, "t2", TURN2.prompt_ids + got[1], len(TURN2.prompt_ids))
