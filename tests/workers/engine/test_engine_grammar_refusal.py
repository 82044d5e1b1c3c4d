"""A sampled token the grammar refuses ends the request as an error (finish reason
grammar_error), never a plain stop: forced with a grammar/tokenizer mismatch built for the
test. The prefill engine masks with the checkpoint's tokenizer; the decode engine's grammar
tokenizer is a byte tokenizer, so the first token the prefill sampled for "a" is some other
byte to the decode engine's matcher, which refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
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
