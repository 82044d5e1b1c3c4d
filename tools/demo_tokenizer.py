"""The demo model's tokenizer: byte-level BPE trained with `tokenizers` on the training mix,
with the chat format's markers as single tokens and every digit a token of its own.

Ids 0..4 are the specials every baton checkpoint has (<pad> <s> </s> <|im_start|> <|im_end|>);
they are skipped when decoding. The markup of the Nemotron 3 format (<think>, <tool_call>,
<function=, ...) follows as added tokens that are *not* special: they decode to their text, so
the router's reasoning and tool-call parsers see them in the output. An assistant turn ends with
<|im_end|> (the eos token; </s> ends one too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                 "</tool_response>", "<function=", "</function>", "<parameter=", "</parameter>",
                 "<tools>", "</tools>"]
EOS_TOKENS = ["<|im_end|>", "</s>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` with at most vocab_size entries, trained on `texts`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size: {vocab_size} is below the {minimum} a byte-level "
                         "tokenizer with the chat markup needs")
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one: a number is copied (question -> call, result -> answer) digit by digit.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    markup = [AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens(markup)
    return tokenizer


def write_tokenizer_files(path: str | Path, tokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (the Nemotron 3 chat template, the specials) and
    generation_config.json (the eos ids that end an assistant turn) into `path`."""
    path = Path(path)
    tokenizer.save(str(path / "tokenizer.json"))
    decoder = {}
    for token in [*SPECIAL_TOKENS, *MARKUP_TOKENS]:
        decoder[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": token in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": NEMOTRON3_CHAT_TEMPLATE,
        "added_tokens_decoder": decoder,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.token_to_id("<s>"),
                  "eos_token_id": [tokenizer.token_to_id(t) for t in EOS_TOKENS],
                  "pad_token_id": tokenizer.token_to_id("<pad>")}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
