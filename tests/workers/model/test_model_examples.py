"""examples/tiny: regenerated identically by examples/make_tiny.py, loads, and carries a
working tokenizer and chat template."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jinja2
import torch
from tokenizers import Tokenizer

from baton.workers.model import load_model

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_make_tiny_reproduces_the_committed_checkpoint(tmp_path):
    script = runpy.run_path(str(EXAMPLES / "make_tiny.py"))
    script["main"](["make_tiny.py", str(tmp_path)])
    committed = sorted(p.name for p in (EXAMPLES / "tiny").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "tiny" / name).read_bytes(), name


def test_tiny_checkpoint_runs_with_its_tokenizer():
    path = EXAMPLES / "tiny"
    model = load_model(path, dtype=torch.float32)
    assert model.layer_kinds == ["mamba", "attention", "moe", "mamba", "mlp", "moe",
                                 "attention", "moe"]
    assert model.num_mtp_layers == 2
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() <= model.config.vocab_size
    text = "Hello! How are you today?"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()

    config = json.loads((path / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "Hi"}]
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        template = env.from_string(config["chat_template"])
        thinking = template.render(messages=messages, add_generation_prompt=True)
        plain = template.render(messages=messages, add_generation_prompt=True,
                                enable_thinking=False)
        assert thinking == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                            "<|im_start|>assistant\n<think>\n")
        assert plain.endswith("<|im_end|>\n<|im_start|>assistant\n<think></think>")
    special = [tokenizer.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<|im_start|>",
                                                  "<|im_end|>")]
    assert special == [0, 1, 2, 3, 4]
    assert tokenizer.encode("<|im_start|>user").ids[0] == 3
