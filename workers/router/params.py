"""Parsing and validating OpenAI request bodies.

`parse_completion` and `parse_chat` turn a decoded JSON body into a `ParsedRequest` or raise
ApiError(400) naming the parameter, its value and what is allowed (the Responses API's
parser, responses_api.py, builds the same ParsedRequest from its own shape). Tokenizing, the
context check, the default max_tokens and the output grammar happen later (server.py), where
the tokenizer is.

Fields OpenAI defines but baton does not implement are accepted only at their neutral value
(e.g. best_of 1), so a client never silently gets different semantics. Unknown fields are
refused, as OpenAI's API does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from baton.workers.router.errors import bad_request, invalid_type
from baton.workers.router.grammar import OutputFormat
from baton.workers.router.schema_check import check_schema
from baton.workers.router.tools import (
    FunctionTool,
    ToolChoice,
    assistant_tool_calls,
    parse_tool_choice,
    parse_tools,
)
from baton.workers.sampling_params import (
    BIAS_RANGE,
    PENALTY_RANGE,
    SamplingParams,
    seed_from_openai,
)

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
# Choices per request (prompts x n), OpenAI's bound on n.
MAX_CHOICES = 128
MAX_CACHE_KEY_CHARS = 1024
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_REPETITION_PENALTY = 10.0
# The wire width of the workers' integer fields (proto/baton/worker/v1: uint32 max_tokens,
# top_k, min_tokens, top_logprobs, token ids; uint64 seed): every integer a client sends is
# checked against it, so none overflows on its way to a worker.
UINT32_MAX = 2**32 - 1
PRIORITY_LIMIT = 2**31 - 1  # `priority` in [-PRIORITY_LIMIT, PRIORITY_LIMIT]
# OpenAI's default for the legacy completions endpoint; chat defaults to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's reasoning_effort levels: none turns thinking off, the others pick a token budget
# (RouterSettings.reasoning, the Model's spec.router.reasoning).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# The explicit reasoning budget's field, as vLLM names it.
THINKING_BUDGET_FIELD = "thinking_token_budget"


@dataclass
class Prompt:
    """One prompt of a completions request: text, or token ids."""

    text: str | None = None
    ids: list[int] | None = None


@dataclass
class ParsedRequest:
    """A validated request, before tokenization."""

    endpoint: str  # "completions" | "chat" | "responses"
    model: str
    prompts: list[Prompt] = field(default_factory=list)  # completions: one choice set each
    messages: list[dict[str, Any]] | None = None  # chat and responses, as the template takes
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[FunctionTool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None  # the answer ends after this many calls (None: no limit)
    output_format: OutputFormat | None = None  # response_format / text.format
    n: int = 1
    echo: bool = False  # completions: the prompt's text before the output
    cache_key: str | None = None  # prompt_cache_key: session affinity for the prefix cache
    priority: int = 0  # vLLM's: lower is admitted first among the same API key's requests
    cache_salt: str | None = None  # vLLM's: the prefix cache is shared only under the same salt
    max_tokens: int | None = None  # None: the endpoint's default
    # Everything the workers apply; max_tokens, the seed of choices after the first and the
    # grammar are set per choice once the prompt is known (server.py).
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage per chunk
    reasoning_effort: str | None = None  # one of REASONING_EFFORTS; None: the default
    reasoning_budget: int | None = None  # thinking_token_budget: the reasoning's most tokens
    snapshot_points: tuple[int, ...] = ()  # completions: where to snapshot the prompt too
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (exact, for tooling)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cache_salt_field(body: dict) -> str | None:
    """vLLM's cache_salt: a non-empty string (at most MAX_CACHE_KEY_CHARS characters)."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt
                             or len(salt) > MAX_CACHE_KEY_CHARS):
        raise invalid_type("cache_salt", salt,
                           f"a non-empty string of at most {MAX_CACHE_KEY_CHARS} characters")
    return salt


def int_field(body: dict, name: str, lo: int = 0, hi: int = UINT32_MAX) -> int | None:
    """body[name], an integer in [lo, hi] (by default what a uint32 on the wire holds)."""
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid_type(name, v, "an integer")
    if not lo <= v <= hi:
        raise bad_request(f"{name}: must be an integer between {lo} and {hi}, got {v!r:.40}",
                          param=name, code="invalid_value")
    return v


def _float(body: dict, name: str, lo: float, hi: float, default: float,
           lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid_type(name, v, "a number")
    if v < lo or v > hi or (lo_open and v == lo):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise bad_request(
            f"{name}: must be {bound} and <= {hi:g}, got {v}", param=name, code="invalid_value"
        )
    return float(v)


_KINDS = {str: "a string", dict: "an object", list: "a list"}


def optional_field(body: dict, name: str, kind: type, where: str | None = None) -> Any:
    """body[name] if it is absent (None) or of the given kind; else a 400 naming it."""
    v = body.get(name)
    if v is not None and not isinstance(v, kind):
        raise invalid_type(where or name, v, _KINDS.get(kind, kind.__name__))
    return v


def bool_field(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid_type(name, v, "a boolean")
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
        raise invalid_type("stop", v, "a string or a list of strings")
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
    # map(type, ...) and min() run at C speed: prompts can hold a context's worth of ids.
    if not isinstance(v, list) or not set(map(type, v)) <= {int}:
        raise invalid_type(name, v, "a list of integer token ids")
    if v and min(v) < 0:
        raise bad_request(f"{name}: token ids must be >= 0", param=name, code="invalid_value")
    return v


def check_known(body: dict, known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
            code="unknown_parameter",
        )


# What sampling_params reads: the sampling fields every generation endpoint takes
# (completions, chat and the Responses API alike).
SAMPLING_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
})
_COMMON = SAMPLING_FIELDS | {
    "model", "max_tokens", "n", "stream", "stream_options", "logprobs", "user",
    "return_tokens_as_token_ids", "prompt_cache_key", "priority", "cache_salt",
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix", "snapshot_points"}
MAX_SNAPSHOT_POINTS = 16
_CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata",
    "reasoning_effort", THINKING_BUDGET_FIELD,
}


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's {"token id": bias}: ids as strings (JSON keys), biases in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid_type("logit_bias", v, "an object of token id -> bias")
    if len(v) > MAX_LOGIT_BIAS_TOKENS:
        raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(v)}",
                          param="logit_bias", code="invalid_value")
    bias = {}
    for key, value in v.items():
        # ASCII digits only: str.isdigit() also holds for "²" and "١", which int() refuses
        # or reads as another number.
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 10 else None
        if token is None or token > UINT32_MAX:
            raise bad_request(f"logit_bias: {key!r:.40} is not a token id (a non-negative "
                              f"integer in ASCII digits, at most {UINT32_MAX})",
                              param="logit_bias", code="invalid_value")
        if not _is_number(value) or not -BIAS_RANGE <= value <= BIAS_RANGE:
            raise bad_request(f"logit_bias[{key}]: must be a number in [-{BIAS_RANGE:g}, "
                              f"{BIAS_RANGE:g}], got {value!r:.40}", param="logit_bias",
                              code="invalid_value")
        bias[token] = float(value)
    return bias


def sampling_params(body: dict, **fields: Any) -> SamplingParams:
    """The SamplingParams fields every generation endpoint shares (SAMPLING_FIELDS;
    max_tokens and logprobs are the endpoint's to set)."""
    # int64 (OpenAI's) or uint64 (the wire's): either is taken.
    seed = int_field(body, "seed", -(2**63), 2**64 - 1)
    stop_token_ids = body.get("stop_token_ids")
    return SamplingParams(
        temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=int_field(body, "top_k", 0) or 0,
        seed=None if seed is None else seed_from_openai(seed),
        presence_penalty=_float(body, "presence_penalty", -PENALTY_RANGE, PENALTY_RANGE, 0.0),
        frequency_penalty=_float(body, "frequency_penalty", -PENALTY_RANGE, PENALTY_RANGE,
                                 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY, 1.0,
                                  lo_open=True),
        logit_bias=_logit_bias(body),
        min_tokens=int_field(body, "min_tokens", 0) or 0,
        stop=_stop(body),
        stop_token_ids=[] if stop_token_ids is None else _token_ids("stop_token_ids",
                                                                    stop_token_ids),
        ignore_eos=bool_field(body, "ignore_eos"),
        **fields,
    )


def parse_reasoning(req: ParsedRequest, effort: Any, body: dict, effort_param: str) -> None:
    """The request's reasoning effort (effort_param names its field) and explicit budget;
    effort "none" turns thinking off in the chat template (unless the request's
    chat_template_kwargs say otherwise)."""
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise bad_request(f"{effort_param}: must be one of {', '.join(REASONING_EFFORTS)}, "
                              f"got {effort!r:.80}", param=effort_param, code="invalid_value")
        req.reasoning_effort = effort
        if effort == "none":
            req.chat_template_kwargs.setdefault("enable_thinking", False)
    req.reasoning_budget = int_field(body, THINKING_BUDGET_FIELD, 0)


def _common(body: dict, endpoint: str) -> ParsedRequest:
    model = body.get("model")
    if model is None:
        raise bad_request("model: required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_type("model", model, "a string")
    n = int_field(body, "n", 1, MAX_CHOICES) or 1
    stream = bool_field(body, "stream")
    opts = body.get("stream_options")
    include_usage = continuous = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid_type("stream_options", opts, "an object")
        if not stream:
            raise bad_request("stream_options: only allowed when stream is true",
                              param="stream_options", code="invalid_value")
        extra = sorted(set(opts) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise bad_request(f"stream_options: unknown option {extra[0]!r}",
                              param="stream_options", code="unknown_parameter")
        include_usage = bool_field(opts, "include_usage")
        continuous = bool_field(opts, "continuous_usage_stats")
    optional_field(body, "user", str)
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None and (not isinstance(cache_key, str)
                                  or len(cache_key) > MAX_CACHE_KEY_CHARS):
        raise invalid_type("prompt_cache_key", cache_key,
                         f"a string of at most {MAX_CACHE_KEY_CHARS} characters")
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        n=n,
        cache_key=cache_key,
        priority=int_field(body, "priority", -PRIORITY_LIMIT, PRIORITY_LIMIT) or 0,
        cache_salt=cache_salt_field(body),
        max_tokens=int_field(body, "max_tokens", 1),
        sampling=sampling_params(body),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        tokens_as_ids=bool_field(body, "return_tokens_as_token_ids"),
    )


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_body")
    return body


def _prompt(name: str, value: Any) -> Prompt:
    if isinstance(value, str):
        if value == "":
            raise bad_request(f"{name}: must not be empty", param="prompt",
                              code="invalid_value")
        return Prompt(text=value)
    if isinstance(value, list):
        ids = _token_ids(name, value)
        if not ids:
            raise bad_request(f"{name}: must not be empty", param="prompt",
                              code="invalid_value")
        return Prompt(ids=ids)
    raise bad_request(f"{name}: expected a string or a list of token ids, got "
                      f"{type(value).__name__}", param="prompt", code="invalid_type")


def _prompts(value: Any) -> list[Prompt]:
    """A string, a list of token ids, or a list of either (one choice set per prompt)."""
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        return [_prompt(f"prompt[{i}]", p) for i, p in enumerate(value)]
    if isinstance(value, list) and not value:
        raise bad_request("prompt: must not be empty", param="prompt", code="invalid_value")
    return [_prompt("prompt", value)]


def parse_completion(body: Any) -> ParsedRequest:
    """Validate a POST /v1/completions body."""
    body = require_object(body)
    check_known(body, _COMPLETION_FIELDS)
    req = _common(body, "completions")
    _neutral(body, "best_of", (1,), "best_of other than 1")
    _neutral(body, "suffix", ("",), "suffix")
    req.sampling.logprobs = int_field(body, "logprobs", 0, MAX_LOGPROBS)
    req.echo = bool_field(body, "echo")
    if req.echo and req.sampling.logprobs is not None:
        raise bad_request("echo: with logprobs it would need the prompt's logprobs, which "
                          "baton does not compute; use one or the other", param="echo",
                          code="unsupported_value")
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt: required", param="prompt", code="missing_required_parameter")
    req.prompts = _prompts(body["prompt"])
    points = body.get("snapshot_points")
    if points is not None:
        points = _token_ids("snapshot_points", points)
        if len(points) > MAX_SNAPSHOT_POINTS or points != sorted(set(points)) or 0 in points:
            raise bad_request(f"snapshot_points: at most {MAX_SNAPSHOT_POINTS} ascending "
                              f"prompt offsets above 0, got {points!r:.80}",
                              param="snapshot_points", code="invalid_value")
        req.snapshot_points = tuple(points)
    if len(req.prompts) * req.n > MAX_CHOICES:
        raise bad_request(f"prompt: {len(req.prompts)} prompts x n={req.n} choices is more "
                          f"than {MAX_CHOICES}", param="prompt", code="invalid_value")
    return req


def text_content(name: str, content: Any) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text",
                                                                      "output_text") \
                    or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"{name}[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                    f"supported, got {part!r:.80}", param=name, code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid_type(name, content, "a string or a list of text parts")


def _message(i: int, m: Any) -> dict[str, Any]:
    """messages[i] as the chat template takes it."""
    name = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid_type(name, m, "an object")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(
            f"{name}.role: must be one of {', '.join(CHAT_ROLES)}, got {role!r:.80}",
            param=f"{name}.role", code="invalid_value",
        )
    # The Nemotron 3 format has one instruction role: OpenAI's developer messages are system.
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    content = m.get("content")
    if content is None:
        if role != "assistant":
            raise bad_request(f"{name}.content: required for role {role!r}",
                              param=f"{name}.content", code="missing_required_parameter")
        out["content"] = ""
    else:
        out["content"] = text_content(f"{name}.content", content)
    if role == "assistant":
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise invalid_type(f"{name}.reasoning_content", reasoning, "a string")
            out["reasoning_content"] = reasoning
        if m.get("tool_calls") is not None:
            out["tool_calls"] = assistant_tool_calls(i, m["tool_calls"])
    if role == "tool" and m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise invalid_type(f"{name}.tool_call_id", m["tool_call_id"], "a string")
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise invalid_type(f"{name}.name", m["name"], "a string")
        out["name"] = m["name"]
    return out


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise bad_request("messages: required", param="messages",
                          code="missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid_type("messages", messages, "a list of messages")
    if not messages:
        raise bad_request("messages: must not be empty", param="messages", code="invalid_value")
    return [_message(i, m) for i, m in enumerate(messages)]


def parse_json_schema_format(value: Any, param: str, flat: bool) -> OutputFormat:
    """{"type": "json_schema", ...}: chat nests name / schema under "json_schema", the
    Responses API's text.format has them on the format itself (flat)."""
    spec = value if flat else value.get("json_schema")
    where = param if flat else f"{param}.json_schema"
    if not isinstance(spec, dict):
        raise invalid_type(where, spec, "an object with name and schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid_type(f"{where}.schema", schema, "a JSON Schema object")
    check_schema(schema, f"{where}.schema")
    name = optional_field(spec, "name", str, f"{where}.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_type(f"{where}.strict", strict, "a boolean")
    return OutputFormat("json_schema", schema, name, param=f"{where}.schema",
                        strict=bool(strict))


def parse_output_format(value: Any, param: str, flat: bool = False) -> OutputFormat | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type(param, value, "an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object", param=param)
    if kind == "json_schema":
        return parse_json_schema_format(value, param, flat)
    raise bad_request(f"{param}.type: must be text, json_object or json_schema, got "
                      f"{kind!r:.80}", param=param, code="invalid_value")


def parse_chat(body: Any) -> ParsedRequest:
    """Validate a POST /v1/chat/completions body."""
    body = require_object(body)
    check_known(body, _CHAT_FIELDS)
    req = _common(body, "chat")
    mct = int_field(body, "max_completion_tokens", 1)
    if mct is not None:
        if req.max_tokens is not None and req.max_tokens != mct:
            raise bad_request(
                f"max_tokens ({req.max_tokens}) and max_completion_tokens ({mct}) disagree",
                param="max_completion_tokens", code="invalid_value",
            )
        req.max_tokens = mct
    want_logprobs = bool_field(body, "logprobs")
    top = int_field(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and top > 0 and not want_logprobs:
        raise bad_request("top_logprobs: requires logprobs to be true", param="top_logprobs",
                          code="invalid_value")
    req.sampling.logprobs = (top or 0) if want_logprobs else None
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise invalid_type("chat_template_kwargs", kwargs, "an object")
        reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt"})
        if reserved:
            raise bad_request(f"chat_template_kwargs: {reserved[0]!r} is set by the request "
                              f"itself", param="chat_template_kwargs", code="invalid_value")
        req.chat_template_kwargs = dict(kwargs)
    parse_reasoning(req, body.get("reasoning_effort"), body, "reasoning_effort")
    req.output_format = parse_output_format(body.get("response_format"), "response_format")
    req.tools = parse_tools(body.get("tools"))
    req.tool_choice = parse_tool_choice(body.get("tool_choice"), req.tools)
    req.parallel_tool_calls = bool_field(body, "parallel_tool_calls", default=True)
    if req.output_format is not None and req.tool_choice.mode in ("required", "function"):
        raise bad_request("response_format: a tool_choice that forces a call leaves no "
                          "answer to format", param="response_format", code="invalid_value")
    req.messages = parse_messages(body.get("messages"))
    return req
