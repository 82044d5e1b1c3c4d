"""Grammar-constrained decoding (llguidance) with the shipped tiny model (random weights: the
grammar alone guarantees the shape): JSON Schema outputs validate, speculation changes no
token, the grammar state survives the prefill -> decode handoff and a retry, bad grammars are
clear errors, and the grammar ends the request."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import pytest
import torch
from llguidance import LLMatcher

from baton.workers.engine import Engine, EngineConfig, EngineLoop, Request, SamplingParams
from baton.workers.engine.grammar import GrammarCompiler, GrammarState, MaskComputer
from baton.workers.text.tokenizer import load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
# Bounded whitespace: a random model would otherwise pad forever where JSON allows spaces.
GRAMMAR = LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
TOKENIZER = load_tokenizer(TINY)


def lark(source: str) -> str:
    """A lark grammar in the wire format (TopLevelGrammar JSON)."""
    return json.dumps({"grammars": [{"lark_grammar": source}]})


@pytest.fixture(scope="module")
def tiny():
    from baton.workers.model import load_model

    return load_model(TINY, dtype=torch.float32, kernels="torch"), TOKENIZER


def engine_for(tiny, k: int = 0, **kw) -> Engine:
    model, tokenizer = tiny
    cfg = {"page_size": 16, "num_pages": 256, "max_num_seqs": 20, "max_batch_tokens": 256,
           "max_model_len": 512, "speculative_tokens": k, "base_seed": 0, **kw}
    return Engine(model, EngineConfig(**cfg), grammar_tokenizer=tokenizer)


def drain(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


def run(tiny, requests, k: int = 0, **kw) -> dict[str, tuple[list[int], str]]:
    engine = engine_for(tiny, k, **kw)
    for r in requests:
        engine.add_request(r)
    events = drain(engine)
    assert engine.stats().kv_cache_usage == 0
    return {rid: ([e.token_id for e in evs if e.token_id is not None], evs[-1].finish_reason)
            for rid, evs in events.items()}


def constrained(rid: str, seed: int | None, grammar: str = GRAMMAR, **kw) -> Request:
    sp = {"max_tokens": 160, "temperature": 1.0 if seed is not None else 0.0, "seed": seed,
          "grammar": grammar, **kw}
    return Request(rid, TOKENIZER.encode(f"Describe person {rid}:"), SamplingParams(**sp))


def check_json(tiny, tokens: list[int], finish: str) -> dict:
    assert finish == "stop"
    text = tiny[1].decode(tokens)
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


@pytest.mark.parametrize("spec_sampling", ["coupled", "rejection"])
def test_json_schema_outputs_validate_for_20_seeds(tiny, spec_sampling):
    """Temperature 1.0, 20 seeds, speculation off and on: every output validates, and in
    coupled mode speculation changes no token."""
    requests = [constrained(f"s{seed}", seed) for seed in range(20)]
    off = run(tiny, requests)
    on = run(tiny, [constrained(f"s{seed}", seed) for seed in range(20)], k=2,
             spec_sampling=spec_sampling)
    values = []
    for rid in off:
        values.append(check_json(tiny, *off[rid]))
        check_json(tiny, *on[rid])
        if spec_sampling == "coupled":
            assert on[rid] == off[rid], rid
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1  # seeds do differ


def test_greedy_constrained_output_is_the_same_with_speculation(tiny):
    requests = [constrained(f"g{i}", None) for i in range(3)]
    off = run(tiny, requests)
    on = run(tiny, [constrained(f"g{i}", None) for i in range(3)], k=2)
    for rid in off:
        check_json(tiny, *off[rid])
        assert on[rid] == off[rid]


def test_drafts_the_grammar_refuses_are_rejected(tiny, monkeypatch):
    """Drafts sampled without the grammar (most of them invalid JSON): verification refuses
    each one the matcher (advanced through the drafts before it) refuses, and the output is
    exactly the non-speculative one."""
    refused = []
    real_push = GrammarState.push

    def counting_push(self, draft):
        ok = real_push(self, draft)
        if not ok:
            refused.append(draft)
        return ok

    monkeypatch.setattr(GrammarState, "push", counting_push)
    off = run(tiny, [constrained(f"d{seed}", seed) for seed in range(4)])
    engine = engine_for(tiny, k=3)
    real_draft, real_apply = engine.runner.draft, engine.runner.logits.apply

    def unmasked(logits, plan, in_place=False):
        if plan is not None and plan.masks is not None:
            plan.masks.wait()  # the matchers are the helper thread's until then
        return logits

    def draft_without_grammar(seqs):
        engine.runner.logits.apply = unmasked
        try:
            return real_draft(seqs)
        finally:
            engine.runner.logits.apply = real_apply

    engine.runner.draft = draft_without_grammar
    for seed in range(4):
        engine.add_request(constrained(f"d{seed}", seed))
    events = drain(engine)
    assert refused, "no draft was refused: the test did not exercise verification"
    assert engine.stats().spec_accepted_tokens_total > 0
    for rid, evs in events.items():
        tokens = [e.token_id for e in evs if e.token_id is not None]
        assert (tokens, evs[-1].finish_reason) == off[rid]


def handoff(tiny, request: Request, k: int) -> tuple[object, list]:
    class Forward:
        def __init__(self, reservation):
            self.reservation = reservation

        def on_layer(self, state):
            self.reservation.write(state)

    p, d = engine_for(tiny), engine_for(tiny, k)
    res = d.reserve(request, len(request.prompt_ids))
    res.bind(res.token, res.chain_hash)
    result = p.prefill(request, Forward(res))
    res.commit(result.first_token, request.sampling)
    return result, drain(d)[request.request_id]


@pytest.mark.parametrize("k", [0, 2])
def test_the_handoff_keeps_the_grammar_state(tiny, k):
    """The prefill engine samples the first token under the grammar; the decode engine
    rebuilds the matcher from it and continues exactly as one engine would."""
    for seed in (0, 7):
        single = run(tiny, [constrained("h", seed)])["h"]
        result, events = handoff(tiny, constrained("h", seed), k)
        tokens = [e.token_id for e in events]
        assert tokens[0] == result.first_token
        assert (tokens, events[-1].finish_reason) == single
        check_json(tiny, *single)


def test_a_grammar_completed_by_the_first_token_ends_on_the_decode_engine(tiny):
    tokenizer = tiny[1]
    (a,) = tokenizer.encode("a")
    request = Request("one", tokenizer.encode("x"), SamplingParams(
        max_tokens=10, temperature=0.0, grammar=lark('start: "a"')))
    result, events = handoff(tiny, request, 2)
    assert result.first_token == a and result.finish_reason == "stop"
    assert [(e.token_id, e.finish_reason) for e in events] == [(a, "stop")]


@pytest.mark.parametrize("k", [0, 2])
def test_a_retry_with_num_output_tokens_resumes_the_grammar(tiny, k):
    full, finish = run(tiny, [constrained("r", 3)])["r"]
    base = constrained("r", 3)
    for m in (1, len(full) // 2):
        retry = Request("r", base.prompt_ids + full[:m], SamplingParams(
            **{**base.sampling.__dict__, "max_tokens": 160 - m}), num_output_tokens=m)
        assert run(tiny, [retry], k)["r"] == (full[m:], finish)
    # Output the grammar refuses cannot be resumed: a clear error, nothing admitted.
    engine = engine_for(tiny)
    bad = tiny[1].encode("nope")
    with pytest.raises(ValueError, match="num_output_tokens=.*grammar refuses output token 0"):
        engine.add_request(Request("x", base.prompt_ids + bad, base.sampling,
                                   num_output_tokens=len(bad)))
    assert not engine.has_work()


@pytest.mark.parametrize(
    "grammar,reason",
    [
        ("start: a", "not JSON"),
        ('{"grammar": []}', '"grammars" list'),
        (LLMatcher.grammar_from_json_schema({"type": "strnig"}), "strnig"),
        (lark("start: foo\nfoo: bar"), 'unknown name: "bar"'),
    ],
)
def test_an_uncompilable_grammar_is_a_clear_error(tiny, grammar, reason):
    engine = engine_for(tiny)
    request = Request("bad", [5, 6], SamplingParams(grammar=grammar))
    with pytest.raises(ValueError, match="SamplingParams.grammar is invalid") as info:
        engine.add_request(request)
    assert reason in str(info.value)
    # Through the loop: refused on the caller's thread, the loop goes on serving.
    with EngineLoop(engine) as loop:
        with pytest.raises(ValueError, match="SamplingParams.grammar is invalid"):
            loop.submit(request)
        good = loop.submit(constrained("good", 1))
        events = list(good)
        check_json(tiny, [e.token_id for e in events], events[-1].finish_reason)


def test_grammars_compile_once_off_the_engine_thread(tiny, monkeypatch):
    engine = engine_for(tiny)
    compiler = engine.runner.logits.grammars
    threads = []
    real = GrammarCompiler.compile

    def recording(self, grammar):
        before = self.compiled_total
        matcher = real(self, grammar)
        if self.compiled_total > before:
            threads.append(threading.current_thread().name)
        return matcher

    monkeypatch.setattr(GrammarCompiler, "compile", recording)
    with EngineLoop(engine, name="engine-thread") as loop:
        streams = [loop.submit(constrained(f"c{i}", i)) for i in range(3)]
        for stream in streams:
            list(stream)
    assert compiler.compiled_total == 1
    assert threads == [threading.current_thread().name]


def test_the_compiled_grammar_cache_is_bounded(tiny):
    compiler = GrammarCompiler(tiny[1], 512, [4], cache_size=2)
    grammars = [lark(f'start: "{word}"') for word in ("one", "two", "three")]
    for g in grammars:
        compiler.compile(g)
    assert compiler.compiled_total == 3
    compiler.compile(grammars[2])
    assert compiler.compiled_total == 3  # a hit
    compiler.compile(grammars[0])
    assert compiler.compiled_total == 4  # the oldest was evicted


def test_the_grammar_ends_the_request_even_past_eos(tiny):
    """ignore_eos: nothing but the grammar can end it, and it does (finish "stop")."""
    tokenizer = tiny[1]
    choices = ("yes", "no", "maybe")
    grammar = lark(" | ".join(f'"{c}"' for c in choices).join(["start: ", ""]))
    requests = [Request(f"c{i}", tokenizer.encode("Answer:"), SamplingParams(
        max_tokens=50, temperature=1.0, seed=i, ignore_eos=True, grammar=grammar))
        for i in range(6)]
    for tokens, finish in run(tiny, requests, k=2).values():
        assert finish == "stop" and tokenizer.decode(tokens) in choices


def test_a_tool_call_grammar_with_embedded_json_schema(tiny):
    """The shape the router builds for tool_choice: lark around a %json schema."""
    args = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                             "days": {"type": "integer", "minimum": 1,
                                                      "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False}}
    grammar = lark('start: "<tool_call>" args "</tool_call>"\n'
                   f"args: %json {json.dumps(args)}")
    requests = [Request(f"t{i}", tiny[1].encode("Weather?"), SamplingParams(
        max_tokens=120, temperature=1.0, seed=i, grammar=grammar)) for i in range(4)]
    for tokens, finish in run(tiny, requests, k=2).values():
        text = tiny[1].decode(tokens)
        assert finish == "stop" and text.startswith("<tool_call>")
        assert text.endswith("</tool_call>")
        call = json.loads(text[len("<tool_call>"):-len("</tool_call>")])
        jsonschema.validate(call, {k: v for k, v in args.items() if k != "x-guidance"})


def test_min_tokens_yields_to_a_grammar_that_must_end(tiny):
    tokenizer = tiny[1]
    request = Request("m", tokenizer.encode("x"), SamplingParams(
        max_tokens=20, temperature=0.0, min_tokens=10, grammar=lark('start: "ab"')))
    tokens, finish = run(tiny, [request])["m"]
    assert tokenizer.decode(tokens) == "ab" and finish == "stop"


def test_penalties_and_grammar_together(tiny):
    """Penalties shape the choice inside what the grammar allows; the output stays valid and
    seeded speculation still changes nothing."""
    kw = dict(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.2)
    off = run(tiny, [constrained(f"p{i}", i, **kw) for i in range(4)])
    on = run(tiny, [constrained(f"p{i}", i, **kw) for i in range(4)], k=2)
    plain = run(tiny, [constrained(f"p{i}", i) for i in range(4)])
    for rid in off:
        check_json(tiny, *off[rid])
        assert on[rid] == off[rid]
    assert any(off[rid] != plain[rid] for rid in off)


def test_an_engine_without_a_tokenizer_refuses_grammars(tiny):
    engine = Engine(tiny[0], EngineConfig(num_pages=64, max_model_len=256))
    with pytest.raises(ValueError, match="grammar is not supported by this engine"):
        engine.add_request(Request("g", [5], SamplingParams(grammar=GRAMMAR)))


def test_grammar_state_push_and_settle():
    compiler = GrammarCompiler(TOKENIZER, 512, [4])
    tokenizer = TOKENIZER
    ab = tokenizer.encode("ab")
    assert len(ab) == 2
    state = compiler.new_state(lark('start: "ab" "c"?'), start=10)
    assert state.push(ab[0]) and state.push(ab[1]) and state.pushed == 2
    (z,) = tokenizer.encode("z")
    assert not state.push(z) and state.pushed == 2  # refused: nothing consumed
    state.settle(1)  # verification kept one draft
    assert state.consumed == 11 and state.pushed == 0
    state.consume(ab[1])
    assert state.consumed == 12 and not state.stopped  # "c" may still follow
    (c,) = tokenizer.encode("c")
    state.consume(c)
    assert state.stopped_at == 13


def test_mask_words_unpack_into_an_exact_additive_bias():
    """Token v is bit v % 32 of word v // 32; its bias is 0 when set, -inf when cleared, and
    adding it leaves allowed logits bit-exact (a vocabulary not a multiple of 32 too)."""
    vocab = 1000
    computer = MaskComputer(vocab, "cpu")
    g = torch.Generator().manual_seed(3)
    words = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32,
                          generator=g)
    bias = computer.mask_bias(words)
    assert bias.shape == (3, vocab) and bias.dtype == torch.float32
    for row in range(3):
        for v in range(vocab):
            allowed = (int(words[row, v // 32]) >> (v % 32)) & 1
            assert bias[row, v].item() == (0.0 if allowed else float("-inf")), (row, v)
    logits = torch.randn(3, vocab, generator=g)
    masked = logits + bias
    keep = bias == 0
    assert torch.equal(masked[keep], logits[keep])
    assert torch.isneginf(masked[~keep]).all()
