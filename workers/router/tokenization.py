"""The router's view of the checkpoint's tokenizer (baton.workers.engine.tokenizer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baton.workers.engine.tokenizer import load_tokenizer


class CheckpointTokenizer:
    """encode / chat rendering / decode with the checkpoint's tokenizer and chat template.

    vocab_size is the model's (config.json), which bounds the token ids a client may send;
    it can exceed the tokenizer's own vocabulary (padded embeddings).
    """

    def __init__(self, model_path: str | Path) -> None:
        self._tokenizer = load_tokenizer(model_path)
        config_path = Path(model_path) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.vocab_size = int(config.get("vocab_size") or self._tokenizer.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def render_chat(self, messages: list[dict], template_kwargs: dict[str, Any]) -> list[int]:
        return list(self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **template_kwargs))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))
