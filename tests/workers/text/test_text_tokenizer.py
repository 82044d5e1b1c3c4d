"""Tokenizer loading, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from baton.workers.text import (
    ByteTokenizer,
    IncrementalDetokenizer,
    StopMatcher,
    load_tokenizer,
)

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, café crème brûlée"] * 20
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXT, trainer)
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}
        )
    )
    (root / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    return root


def test_load_reads_specials_and_eos(checkpoint):
    tok = load_tokenizer(checkpoint)
    assert tok.eos_token_ids == [tok.token_to_id("</s>"), 3]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_chat_template_renders_with_kwargs(checkpoint):
    tok = load_tokenizer(checkpoint)
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, enable_thinking=False).endswith("<think></think>")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert tok.token_to_id("<|im_start|>") in ids
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template("hi")


def test_fallback_is_byte_level(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_ids == [0, 1]
    ids = tok.encode("naïve ☃")
    assert len(ids) == len("naïve ☃".encode()) and tok.decode(ids) == "naïve ☃"
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("text", ["café crème ☃ 🎉 brûlée", "日本語のテキスト", "plain words here"])
def test_incremental_detokenizer_never_splits_a_character(checkpoint, text):
    for tok in (load_tokenizer(checkpoint), ByteTokenizer()):
        prompt = tok.encode("hello ", add_special_tokens=False)
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add(i) for i in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
        assert all("\ufffd" not in d for d in deltas)
        assert sum(1 for d in deltas if d) > 1  # it streams, not all at the end
        if any(ord(c) > 127 for c in text):
            # Some character spans several tokens: an empty delta was needed somewhere.
            assert "" in deltas[:-1]


def test_stop_matcher_cuts_and_holds_back():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("hello S") == ("hello ", False)  # "S" might start "STOP"
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # not a stop after all
    assert m.feed(" end\n") == (" end", False)
    assert m.feed("\nmore") == ("", True)
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.flush() == "ab"
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    m = StopMatcher(["ab"])
    assert m.feed("zzabyy") == ("zz", True)


def test_stop_matcher_earliest_stop_and_characters_across_tokens():
    m = StopMatcher(["three", "two"])
    assert m.feed("one two three") == ("one ", True)
    # Byte tokens: "→" spans three tokens, the stop string matches once it is complete.
    tok = ByteTokenizer()
    detok, m = IncrementalDetokenizer(tok), StopMatcher(["→"])
    out, stopped = "", False
    for i in tok.encode("résumé → done"):
        piece, stopped = m.feed(detok.add(i))
        out += piece
        if stopped:
            break
    assert (out, stopped) == ("résumé ", True)
