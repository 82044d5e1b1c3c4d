"""Tokenizers: a checkpoint's tokenizer.json (through `tokenizers`) or a byte-level fallback.

`load_tokenizer(path)` reads tokenizer.json, the chat template and special tokens from
tokenizer_config.json, and eos ids from config.json / generation_config.json. A checkpoint
without tokenizer.json gets `ByteTokenizer`: token id b is the byte b (ids >= 256 are specials
and decode to nothing), which every vocabulary of at least 256 entries can carry.

Text assembly from token streams lives beside it, in baton.workers.text.streaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _eos_ids_from(config: dict) -> list[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


class _ChatTemplateMixin:
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **chat_template_kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the checkpoint's jinja2 chat template.

        chat_template_kwargs reach the template as variables (e.g. enable_thinking=False).
        Returns the prompt text, or its token ids with tokenize=True.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json)")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        text = _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **chat_template_kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str):
    if source not in _TEMPLATES:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, indent=indent, ensure_ascii=False
        )
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class Tokenizer(_ChatTemplateMixin):
    """A `tokenizers.Tokenizer` with the checkpoint's specials and chat template."""

    def __init__(
        self,
        backend: Any,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: list[int] | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        ids = list(eos_token_ids or [])
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            ids.insert(0, backend.token_to_id(eos_token))
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


class ByteTokenizer(_ChatTemplateMixin):
    """Token id b < 256 is the byte b; ids from 256 up are specials that decode to nothing."""

    def __init__(self, eos_token_ids: list[int] | None = None, chat_template: str | None = None):
        self.eos_token_ids = list(eos_token_ids or [])
        self.chat_template = chat_template
        self.bos_token = None
        self.eos_token = None
        self.bos_token_id = None

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None


def load_tokenizer(path: str | Path) -> Tokenizer | ByteTokenizer:
    """The tokenizer of the checkpoint directory at path (ByteTokenizer when it has none)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"tokenizer path {str(root)!r} is not a directory")
    config = _read_json(root / "config.json")
    eos_ids = _eos_ids_from(_read_json(root / "generation_config.json")) or _eos_ids_from(config)
    tok_config = _read_json(root / "tokenizer_config.json")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the "default" one serves chat requests.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    if not (root / "tokenizer.json").is_file():
        return ByteTokenizer(eos_token_ids=eos_ids, chat_template=template)
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(root / "tokenizer.json"))
    return Tokenizer(
        backend,
        chat_template=template,
        bos_token=_token_content(tok_config.get("bos_token")),
        eos_token=_token_content(tok_config.get("eos_token")),
        eos_token_ids=eos_ids,
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
    )
