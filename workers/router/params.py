"""Parsing and validating OpenAI request bodies.

`parse_completion` and `parse_chat` turn a decoded JSON body into a `ParsedRequest` or raise
ApiError(400) naming the parameter, its value and what is allowed. Tokenizing, the context
check and the default max_tokens happen later (server.py), where the tokenizer is.

Fields OpenAI defines but baton does not implement are accepted only at their neutral value
(e.g. presence_penalty 0, best_of 1), so a client never silently gets different semantics.
Unknown fields are refused, as OpenAI's API does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from baton.workers.router.errors import bad_request
from baton.workers.sampling_params import SamplingParams, seed_from_openai

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ParsedRequest:
    """A validated request, before tokenization."""

    endpoint: str  # "completions" | "chat"
    model: str
    prompt_text: str | None = None  # completions with a string prompt
    prompt_ids: list[int] | None = None  # completions with a token-id prompt
    messages: list[dict[str, Any]] | None = None  # chat
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None  # None: the endpoint's default
    # Everything the workers apply; its max_tokens is set once the prompt length is known
    # (server.py: max_tokens above, or the endpoint's default).
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (exact, for tooling)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail_type(name: str, value: Any, expected: str):
    return bad_request(
        f"{name}: expected {expected}, got {type(value).__name__} {value!r}", param=name,
        code="invalid_type",
    )


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise _fail_type(name, v, "an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"{name}: must be {allowed}, got {v}", param=name, code="invalid_value")
    return v


def _float(body: dict, name: str, lo: float, hi: float, default: float,
           lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise _fail_type(name, v, "a number")
    if v < lo or v > hi or (lo_open and v == lo):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise bad_request(
            f"{name}: must be {bound} and <= {hi:g}, got {v}", param=name, code="invalid_value"
        )
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _fail_type(name, v, "a boolean")
    return v


def _neutral(body: dict, name: str, neutral: tuple[Any, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and v not in neutral:
        raise bad_request(
            f"{name}: {what} is not supported; got {v!r}", param=name, code="unsupported_value"
        )


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _fail_type("stop", v, "a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(
            f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop",
            code="invalid_value",
        )
    if any(s == "" for s in stops):
        raise bad_request("stop: stop strings must not be empty", param="stop",
                          code="invalid_value")
    return list(stops)


def _token_ids(name: str, v: Any) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise _fail_type(name, v, "a list of integer token ids")
    if any(t < 0 for t in v):
        raise bad_request(f"{name}: token ids must be >= 0", param=name, code="invalid_value")
    return list(v)


def _check_known(body: dict, known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
            code="unknown_parameter",
        )


_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "stop", "stop_token_ids", "ignore_eos", "seed", "logprobs", "user", "presence_penalty",
    "frequency_penalty", "logit_bias", "return_tokens_as_token_ids",
})
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata",
}


def _common(body: dict, endpoint: str) -> ParsedRequest:
    model = body.get("model")
    if model is None:
        raise bad_request("model: required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _fail_type("model", model, "a string")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request(f"n: only n=1 is supported, got {n}", param="n", code="invalid_value")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _fail_type("stream_options", opts, "an object")
        if not stream:
            raise bad_request("stream_options: only allowed when stream is true",
                              param="stream_options", code="invalid_value")
        extra = sorted(set(opts) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise bad_request(f"stream_options: unknown option {extra[0]!r}",
                              param="stream_options", code="unknown_parameter")
        include_usage = _bool(opts, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _fail_type("user", user, "a string")
    _float(body, "presence_penalty", -2.0, 2.0, 0.0)
    _float(body, "frequency_penalty", -2.0, 2.0, 0.0)
    _neutral(body, "presence_penalty", (0, 0.0), "a presence penalty other than 0")
    _neutral(body, "frequency_penalty", (0, 0.0), "a frequency penalty other than 0")
    lb = body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise _fail_type("logit_bias", lb, "an object")
    _neutral(body, "logit_bias", ({},), "logit_bias")
    seed = _int(body, "seed")
    if seed is not None and not (-(2**63) <= seed < 2**64):
        raise bad_request(f"seed: must fit in 64 bits, got {seed}", param="seed",
                          code="invalid_value")
    stop_token_ids = body.get("stop_token_ids")
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        max_tokens=_int(body, "max_tokens", 1),
        sampling=SamplingParams(
            temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
            top_k=_int(body, "top_k", 0) or 0,
            seed=None if seed is None else seed_from_openai(seed),
            stop=_stop(body),
            stop_token_ids=[] if stop_token_ids is None else _token_ids(
                "stop_token_ids", stop_token_ids),
            ignore_eos=_bool(body, "ignore_eos"),
        ),
        stream=stream,
        include_usage=include_usage,
        tokens_as_ids=_bool(body, "return_tokens_as_token_ids"),
    )


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_body")
    return body


def parse_completion(body: Any) -> ParsedRequest:
    """Validate a POST /v1/completions body."""
    body = _require_object(body)
    _check_known(body, _COMPLETION_FIELDS)
    req = _common(body, "completions")
    _neutral(body, "echo", (False,), "echo")
    _neutral(body, "best_of", (1,), "best_of other than 1")
    _neutral(body, "suffix", ("",), "suffix")
    req.sampling.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt: required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    # A list of prompts asks for one choice per prompt: with n=1 only a single prompt fits.
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(
                f"prompt: only one prompt per request is supported, got {len(prompt)}",
                param="prompt", code="invalid_value",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        if prompt == "":
            raise bad_request("prompt: must not be empty", param="prompt", code="invalid_value")
        req.prompt_text = prompt
    elif isinstance(prompt, list):
        ids = _token_ids("prompt", prompt)
        if not ids:
            raise bad_request("prompt: must not be empty", param="prompt", code="invalid_value")
        req.prompt_ids = ids
    else:
        raise _fail_type("prompt", prompt, "a string or a list of token ids")
    return req


def _message(i: int, m: Any) -> dict[str, Any]:
    name = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _fail_type(name, m, "an object")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(
            f"{name}.role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
            param=f"{name}.role", code="invalid_value",
        )
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str
            ):
                raise bad_request(
                    f"{name}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                    f"are supported, got {part!r}",
                    param=f"{name}.content", code="invalid_value",
                )
            parts.append(part["text"])
        content = "".join(parts)
    elif content is None:
        if role != "assistant":
            raise bad_request(f"{name}.content: required for role {role!r}",
                              param=f"{name}.content", code="missing_required_parameter")
        content = ""
    elif not isinstance(content, str):
        raise _fail_type(f"{name}.content", content, "a string or a list of text parts")
    out = dict(m)
    out["content"] = content
    return out


def parse_chat(body: Any) -> ParsedRequest:
    """Validate a POST /v1/chat/completions body."""
    body = _require_object(body)
    _check_known(body, _CHAT_FIELDS)
    req = _common(body, "chat")
    mct = _int(body, "max_completion_tokens", 1)
    if mct is not None:
        if req.max_tokens is not None and req.max_tokens != mct:
            raise bad_request(
                f"max_tokens ({req.max_tokens}) and max_completion_tokens ({mct}) disagree",
                param="max_completion_tokens", code="invalid_value",
            )
        req.max_tokens = mct
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and top > 0 and not want_logprobs:
        raise bad_request("top_logprobs: requires logprobs to be true", param="top_logprobs",
                          code="invalid_value")
    req.sampling.logprobs = (top or 0) if want_logprobs else None
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise _fail_type("chat_template_kwargs", kwargs, "an object")
        req.chat_template_kwargs = dict(kwargs)
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad_request(f"response_format: only {{'type': 'text'}} is supported, got {rf!r}",
                          param="response_format", code="unsupported_value")
    _neutral(body, "tools", ([],), "tool calling")
    _neutral(body, "tool_choice", ("none",), "tool_choice")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages: required", param="messages",
                          code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _fail_type("messages", messages, "a list of messages")
    if not messages:
        raise bad_request("messages: must not be empty", param="messages", code="invalid_value")
    req.messages = [_message(i, m) for i, m in enumerate(messages)]
    return req
