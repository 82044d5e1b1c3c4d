"""examples/demo, the trained demo model: the Hugging Face layout within 25 MB, every layer
kind of Nemotron 3, the committed chat template, and logits equal to transformers' own
NemotronHForCausalLM (which ignores the MTP weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.workers.model import load_model
from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE
from baton.workers.text.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}


def test_demo_checkpoint_layout():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 25 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "nemotron_h"
    assert config["architectures"] == ["NemotronHForCausalLM"]
    model = load_model(DEMO, dtype=torch.float32)
    assert set(model.config.layer_kinds) == {"mamba", "attention", "moe"}
    assert model.config.moe_latent_size and model.config.n_shared_experts == 1
    assert model.num_mtp_layers == 2
    tokenizer = load_tokenizer(DEMO)
    assert tokenizer.chat_template == NEMOTRON3_CHAT_TEMPLATE
    assert tokenizer.eos_token_ids[0] == tokenizer.token_to_id("<|im_end|>")


def test_transformers_logits_match():
    transformers = pytest.importorskip("transformers")
    reference = transformers.NemotronHForCausalLM.from_pretrained(
        DEMO, dtype=torch.float32).eval()
    model = load_model(DEMO, dtype=torch.float32, kernels="torch")
    tokenizer = load_tokenizer(DEMO)
    code = tokenizer.encode("def mean(values):\n    return sum(values) / len(values)\n" * 4)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                         tools=[CALCULATOR], tokenize=True)
    for ids in (code, chat):
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits.float()
        got = model(torch.tensor([ids]))
        assert got.shape == expected.shape
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
