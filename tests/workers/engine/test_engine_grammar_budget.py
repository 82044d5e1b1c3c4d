"""Grammars of agent traffic in the engine. A reasoning budget (a max_tokens lexeme, which
llguidance cannot roll back) under MTP speculation gives the tokens it gives without, and
bounds the reasoning. A sampled token the grammar refuses ends the request as an error
(finish reason grammar_error), never a plain stop: forced with a grammar/tokenizer mismatch
built for the test. The prefill engine masks with the checkpoint's tokenizer; the decode
engine's grammar tokenizer is a byte tokenizer, so the first token the prefill sampled for
"a" is some other byte to the decode engine's matcher, which refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.router.grammar import OutputFormat, build_grammar
from baton.workers.router.tools import ToolChoice
from baton.workers.text.tokenizer import ByteTokenizer, load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"
CONFIG = {"page_size": 16, "num_pages": 128, "max_num_seqs": 4, "max_batch_tokens": 128,
          "max_model_len": 256, "base_seed": 0}


@pytest.fixture(scope="module")
def model():
    from baton.workers.model import load_model

    return load_model(TINY, dtype=torch.float32, kernels="torch")


class Forward:
    def __init__(self, reservation):
        self.reservation = reservation

    def on_layer(self, state):
        self.reservation.write(state)


@pytest.mark.parametrize("k", [0, 2])
def test_a_refused_first_token_ends_the_request_as_a_grammar_error(model, k):
    tokenizer = load_tokenizer(TINY)
    (a,) = tokenizer.encode("a")
    assert a != ord("a")  # the mismatch: the byte tokenizer reads id a as another byte
    grammar = json.dumps({"grammars": [{"lark_grammar": 'start: "a" "b"'}]})
    request = Request("r", tokenizer.encode("x"), SamplingParams(
        max_tokens=8, temperature=0.0, grammar=grammar))
    prefill = Engine(model, EngineConfig(**CONFIG), grammar_tokenizer=tokenizer)
    decode = Engine(model, EngineConfig(**CONFIG, speculative_tokens=k),
                    grammar_tokenizer=ByteTokenizer())
    reservation = decode.reserve(request, len(request.prompt_ids))
    reservation.bind(reservation.token, reservation.chain_hash)
    result = prefill.prefill(request, Forward(reservation))
    assert result.first_token == a and result.finish_reason is None
    reservation.commit(result.first_token, request.sampling)
    events = []
    while decode.has_work():
        events += decode.step()
    assert [(e.token_id, e.finish_reason) for e in events] == [(a, "grammar_error")]
    stats = decode.stats()
    assert stats.requests_finished_total.get("grammar_error") == 1
    assert stats.kv_cache_usage == 0


def test_a_reasoning_budget_under_speculation(model):
    """Random weights: the budget is what ends the reasoning (the router's grammar, the tiny
    tokenizer spelling `</think>` in pieces); drafts past the budget are rolled back by
    restoring a copy of the matcher."""
    tokenizer = load_tokenizer(TINY)
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    grammar = build_grammar(OutputFormat("json_schema", schema), [], ToolChoice("none"), True,
                            in_reasoning=True, reasoning_budget=6)
    close = len(tokenizer.encode("</think>"))
    outputs = {}
    for k in (0, 2):
        engine = Engine(model, EngineConfig(**CONFIG, speculative_tokens=k),
                        grammar_tokenizer=tokenizer)
        for seed in range(4):
            engine.add_request(Request(f"s{seed}", tokenizer.encode("x"), SamplingParams(
                max_tokens=60, temperature=1.0, seed=seed, grammar=grammar)))
        events = {}
        while engine.has_work():
            for e in engine.step():
                events.setdefault(e.request_id, []).append(e)
        outputs[k] = {rid: [e.token_id for e in evs] for rid, evs in events.items()}
        for evs in events.values():
            ids = [e.token_id for e in evs]
            assert evs[-1].finish_reason == "stop"
            answer = tokenizer.decode(ids).split("</think>", 1)[1]
            assert json.loads(answer)["a"] in range(10)
            # The reasoning's tokens, the close's own included: within the budget and it.
            upto = next(i for i in range(len(ids) + 1)
                        if "</think>" in tokenizer.decode(ids[:i]))
            assert upto <= 6 + close
    assert outputs[0] == outputs[2]
