"""The one sampling-parameter type: validation names the field, the wire round trip keeps every
field, and the conventions (seed, logprobs, top_k/top_p/repetition_penalty neutral values) are
the same on both sides."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from baton.proto.baton.worker.v1 import worker_pb2
from baton.workers.sampling_params import SamplingParams, seed_from_openai


def test_every_field_survives_the_wire():
    params = SamplingParams(
        max_tokens=9, temperature=0.7, top_p=0.8, top_k=5, seed=2**64 - 1,
        stop=["never on the wire"], stop_token_ids=[4, 9], logprobs=3, ignore_eos=True,
        presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.3,
        logit_bias={7: -100.0, 3: 2.5}, min_tokens=4, grammar='{"grammars": []}',
    )
    params.validate()
    wire = params.to_proto()
    assert [(b.token_id, b.bias) for b in wire.logit_bias] == [(3, 2.5), (7, -100.0)]
    back = SamplingParams.from_proto(worker_pb2.SamplingParams.FromString(
        wire.SerializeToString()))
    assert back.stop == []  # text-level: the router keeps stop strings
    assert back == SamplingParams(**{**params.__dict__, "stop": []})


def test_conventions_decided_once():
    plain = SamplingParams.from_proto(SamplingParams(max_tokens=7, temperature=0.0).to_proto())
    assert (plain.max_tokens, plain.temperature, plain.logprobs, plain.seed) == (7, 0.0, None,
                                                                                None)
    # logprobs=0: the chosen token's logprob, no alternatives.
    chosen = SamplingParams(max_tokens=1, logprobs=0).to_proto()
    assert chosen.logprobs and chosen.top_logprobs == 0
    assert SamplingParams.from_proto(chosen).logprobs == 0
    assert SamplingParams.from_proto(SamplingParams(max_tokens=1, logprobs=3).to_proto()
                                     ).logprobs == 3
    # OpenAI's signed seeds map into the unsigned range the wire and the noise key take.
    assert seed_from_openai(-1) == 2**64 - 1 and seed_from_openai(42) == 42
    # Neutral values of fields the wire leaves unset read back as "off".
    bare = SamplingParams.from_proto(worker_pb2.SamplingParams(max_tokens=1))
    assert (bare.top_p, bare.top_k, bare.repetition_penalty, bare.logit_bias) == (1.0, 0, 1.0, {})
    assert SamplingParams(top_k=-1).to_proto().top_k == 0


def test_a_token_biased_twice_on_the_wire_is_refused():
    wire = worker_pb2.SamplingParams(max_tokens=1, logit_bias=[
        worker_pb2.TokenBias(token_id=5, bias=1.0), worker_pb2.TokenBias(token_id=5, bias=2.0)])
    with pytest.raises(ValueError, match="logit_bias.*token 5 is given twice"):
        SamplingParams.from_proto(wire)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", math.nan),
        ("seed", 2**64),
        ("logprobs", True),
        ("logprobs", 21),
        ("presence_penalty", 2.5),
        ("frequency_penalty", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("logit_bias", {3: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", [(3, 1.0)]),
        ("min_tokens", -1),
        ("grammar", {"grammars": []}),
        ("ignore_eos", "yes"),
    ],
)
def test_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value}).validate()


def test_the_module_imports_no_torch():
    code = ("import sys, baton.workers.sampling_params as m; m.SamplingParams().to_proto(); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
