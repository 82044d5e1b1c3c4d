"""Text out of the engine: incremental detokenization and stop strings, on a real checkpoint
(written by write_random_checkpoint, loaded by load_model, tokenizer by load_tokenizer)."""

from __future__ import annotations

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.model import load_model
from baton.workers.model.checkpoint import write_random_checkpoint
from baton.workers.text.tokenizer import load_tokenizer

CONFIG = dict(
    vocab_size=320,
    hidden_size=32,
    hybrid_override_pattern="M*E",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_random_checkpoint(
        tmp_path_factory.mktemp("text"), CONFIG, seed=3, dtype=torch.float32
    )
    model = load_model(path, dtype=torch.float32, kernels="torch")
    return model, load_tokenizer(path)


def generate(model, tok, text: str, **sampling) -> tuple[list, str]:
    engine = Engine(model, EngineConfig(page_size=8, num_pages=64, max_batch_tokens=32), tok)
    ids = tok.encode(text)
    engine.add_request(Request("t", ids, SamplingParams(**sampling)))
    events = []
    while engine.has_work():
        events += engine.step()
    return events, "".join(e.text_delta for e in events)


def test_text_deltas_add_up_to_the_decoded_output(checkpoint):
    model, tok = checkpoint
    events, text = generate(
        model, tok, "The quick brown fox", max_tokens=40, temperature=0, ignore_eos=True
    )
    ids = [e.token_id for e in events]
    prompt = tok.encode("The quick brown fox")
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    # A random model emits invalid UTF-8 too; those bytes come out as U+FFFD exactly as in
    # the one-shot decode, and partial characters were held back (empty deltas) meanwhile.
    assert any(e.text_delta == "" for e in events)


def test_stop_string_cuts_the_text(checkpoint):
    model, tok = checkpoint
    _, full = generate(
        model, tok, "Once upon a time", max_tokens=40, temperature=0, ignore_eos=True
    )
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i - 1 : i + 3]]
    assert clean, f"no clean text to stop on in {full!r}"
    at = clean[len(clean) // 2]
    stop = full[at : at + 3]
    cut = full.index(stop)
    events, text = generate(
        model, tok, "Once upon a time", max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]
    )
    assert events[-1].finish_reason == "stop"
    assert text == full[:cut]
    assert len(events) < 40


def test_eos_from_the_tokenizer_ends_the_request(checkpoint):
    model, tok = checkpoint
    events, _ = generate(model, tok, "Hello", max_tokens=30, temperature=0, ignore_eos=True)
    ids = [e.token_id for e in events]
    engine = Engine(model, EngineConfig(page_size=8, num_pages=64, eos_token_ids=[ids[3]]), tok)
    assert engine.eos_ids == {ids[3]}
    default = Engine(model, EngineConfig(page_size=8, num_pages=64), tok)
    assert default.eos_ids == set(tok.eos_token_ids) and default.eos_ids


def test_chat_template_of_a_written_checkpoint(checkpoint):
    _, tok = checkpoint
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    thinking = tok.apply_chat_template(messages)
    assert thinking.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    assert tok.apply_chat_template(messages, enable_thinking=False).endswith("<think></think>")
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert set(tok.eos_token_ids) == {tok.token_to_id("<|im_end|>"), 2}
