"""TextAssembler: incremental detokenization and stop strings, against a real tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from baton.workers.router.text import TextAssembler


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE whose tokens are single bytes: multi-byte characters span tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def run(bpe, text: str, stop=(), prompt: str = "") -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(lambda ids: bpe.decode(list(ids)), stop,
                        bpe.encode(prompt).ids if prompt else ())
    deltas = [asm.push(t) for t in bpe.encode(text).ids]
    deltas.append(asm.finish())
    return deltas, asm


@pytest.mark.parametrize("text", ["plain ascii words", "naïve café ✓ 😀 end", "日本語のテキスト"])
def test_deltas_concatenate_to_the_text_and_never_split_a_character(bpe, text):
    deltas, asm = run(bpe, text, prompt="context: ")
    assert "".join(deltas) == text == asm.text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 1  # it streams, not all at the end


def test_stop_string_across_tokens_cuts_before_it(bpe):
    deltas, asm = run(bpe, "alpha beta STOP gamma", stop=["STOP"])
    assert "".join(deltas) == "alpha beta " and asm.stopped
    # Text that could begin a stop string is held back, then released when it does not.
    deltas, asm = run(bpe, "a ST b STO c STOP", stop=["STOP"])
    assert "".join(deltas) == "a ST b STO c " and asm.stopped


def test_earliest_of_several_stop_strings_wins(bpe):
    deltas, asm = run(bpe, "one two three", stop=["three", "two"])
    assert "".join(deltas) == "one " and asm.stopped


def test_held_back_prefix_is_released_at_the_end(bpe):
    deltas, asm = run(bpe, "ends with ST", stop=["STOP"])
    assert deltas[-1] == "ST" and "".join(deltas) == "ends with ST" and not asm.stopped


def test_stop_string_with_multibyte_characters(bpe):
    deltas, asm = run(bpe, "résumé → done", stop=["→"])
    assert "".join(deltas) == "résumé " and asm.stopped
    assert asm.push(65) == "" and asm.finish() == ""  # nothing after a stop
