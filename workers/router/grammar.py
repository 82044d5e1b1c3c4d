"""Structured output: a request's response_format / tool_choice as an llguidance grammar.

The grammar travels in SamplingParams.grammar as the JSON serialization of an llguidance
TopLevelGrammar (`{"grammars": [{"lark_grammar": ...}]}`); the workers mask every sampled
token with it. llguidance (fast Earley parsing over a token trie, Lark grammars with inline
JSON Schema, matcher rollback for speculative drafts) is the library; the router only builds
and validates grammars, off the event loop and cached.

The shapes, in llguidance's Lark dialect (`%json {...}` is an inline JSON Schema):

    start: THINK? "\\n"? BODY
    THINK      free text up to and including `</think>`, when the prompt leaves the reasoning
               open (the output starts inside it; the reasoning itself is never constrained)
    BODY       response_format json_object:   %json {"type": "object"}
               response_format json_schema:   %json {schema}
               tool_choice required:          call+   (call, with parallel_tool_calls false)
               tool_choice {"function": f}:   call_f
               tool_choice auto + a format:   call+ | %json {schema}
    call_f:    "<tool_call>\\n<function=f>\\n" param* "</function>\\n</tool_call>\\n"
    param:     "<parameter=KEY>\\n" VALUE "\\n</parameter>\\n", declared parameters in
               schema order, required ones always, others optional, none undeclared
    VALUE      by the parameter's schema: a string is free text (bounded by min/maxLength;
               one of an enum / const), a boolean True | False and null None (what the chat
               template renders), anything else %json {its schema} (with the function's
               $defs, so references resolve)

JSON inside a grammar is compact with json.dumps' separators (", " and ": "), no other
whitespace: the model cannot stall in whitespace, and typed arguments read back exactly.
Markup that is a special token of the tokenizer (`</think>`, `<tool_call>` in some
vocabularies) is written as a token reference (`<tool_call>`), not as text.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from baton.workers.router.tools import FunctionTool, ToolChoice

# llguidance's JSON options for every inline schema (schema["x-guidance"] may override).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class GrammarError(ValueError):
    """The request's schema cannot be compiled; param names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputFormat:
    """What a request asks of its output's shape (response_format / text.format)."""

    kind: str  # "text" | "json_object" | "json_schema"
    schema: Mapping[str, Any] | None = None  # json_schema
    name: str | None = None
    param: str = "response_format"  # the request field it came from, for errors


def _lit(text: str) -> str:
    return json.dumps(text)


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


def _regex_escape(text: str) -> str:
    """text as a literal inside a /regex/ of llguidance's Lark."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in _REGEX_META else c for c in text)


def _json(schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None) -> str:
    doc = dict(schema)
    if defs and "$ref" in json.dumps(schema):  # the function's definitions, where referenced
        for key, value in defs.items():
            doc.setdefault(key, value)
    doc["x-guidance"] = {**JSON_OPTIONS, **(doc.get("x-guidance") or {})}
    return "%json " + json.dumps(doc, ensure_ascii=True)


class _Lark:
    def __init__(self, special: Collection[str]) -> None:
        self.special = special
        self.rules: list[str] = []

    def mark(self, text: str) -> str:
        """Markup as a special-token reference where the tokenizer has one, else as text."""
        return text if text in self.special else _lit(text)

    def add(self, rule: str) -> None:
        self.rules.append(rule)


def _value_rule(g: _Lark, rule: str, schema: Any, defs: Mapping[str, Any]) -> None:
    end = _lit("\n</parameter>\n")
    if not isinstance(schema, Mapping):
        schema = {}
    kind = schema.get("type")
    enum = schema.get("enum")
    if "const" in schema and isinstance(schema["const"], str):
        g.add(f"{rule}: {_lit(schema['const'])} {end}")
    elif isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum) and (
            kind in (None, "string")):
        g.add(f"{rule}: ({' | '.join(_lit(v) for v in enum)}) {end}")
    elif kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        count = "*" if not lo and hi is None else f"{{{int(lo)},{'' if hi is None else int(hi)}}}"
        g.add(f"{rule}[lazy]: /(?s:.){count}{_regex_escape(chr(10) + '</parameter>' + chr(10))}/")
    elif kind == "boolean":
        g.add(f'{rule}: ("True" | "False") {end}')
    elif kind == "null":
        g.add(f'{rule}: "None" {end}')
    else:
        g.add(f"{rule}: {_json(schema, defs)} {end}")


def _call_rule(g: _Lark, k: int, tool: FunctionTool) -> str:
    params = tool.parameters
    defs = {key: params[key] for key in ("$defs", "definitions") if key in params}
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts = []
    for j, (key, schema) in enumerate(props.items()):
        g.add(f"f{k}_p{j}: {_lit('<parameter=' + key + '>' + chr(10))} f{k}_v{j}")
        _value_rule(g, f"f{k}_v{j}", schema, defs)
        parts.append(f"f{k}_p{j}" + ("" if key in required else "?"))
    if not props and params.get("additionalProperties", True) is not False:
        # A function without declared parameters takes any.
        g.add(f"f{k}_any: {_lit('<parameter=')} /[A-Za-z0-9_.\\-]{{1,64}}/ "
              f"{_lit('>' + chr(10))} f{k}_anyv")
        g.add(f"f{k}_anyv[lazy]: /(?s:.)*{_regex_escape(chr(10) + '</parameter>' + chr(10))}/")
        parts.append(f"f{k}_any*")
    header = _lit("\n<function=" + tool.name + ">\n")
    g.add(f"call{k}: {g.mark(TOOL_CALL_OPEN)} {header} {' '.join(parts)} "
          f"{_lit('</function>' + chr(10))} {g.mark(TOOL_CALL_CLOSE)} {_lit(chr(10))}")
    return f"call{k}"


def build_grammar(fmt: OutputFormat | None, tools: Sequence[FunctionTool],
                  tool_choice: ToolChoice, parallel_tool_calls: bool, in_reasoning: bool,
                  special_markup: Collection[str] = ()) -> str | None:
    """The TopLevelGrammar JSON constraining this output, or None when it is unconstrained
    (module docstring for the shapes)."""
    json_body = fmt is not None and fmt.kind in ("json_object", "json_schema")
    constrains_calls = tool_choice.mode in ("required", "function")
    if not json_body and not constrains_calls:
        return None
    g = _Lark(special_markup)
    bodies = []
    if constrains_calls or (tool_choice.mode == "auto" and tools):
        chosen = [(k, t) for k, t in enumerate(tools)
                  if tool_choice.mode != "function" or t.name == tool_choice.function]
        calls = [_call_rule(g, k, t) for k, t in chosen]
        g.add(f"call: {' | '.join(calls)}")
        many = parallel_tool_calls and tool_choice.mode != "function"
        bodies.append("call+" if many else "call")
    if json_body and tool_choice.mode != "required" and tool_choice.mode != "function":
        schema = fmt.schema if fmt.kind == "json_schema" else {"type": "object"}
        g.add(f"json_body: {_json(schema)}")
        bodies.append("json_body")
    start = "start: "
    if in_reasoning:
        if THINK_CLOSE in special_markup:
            g.add("THINK_TEXT: /(?s:.)*/")
            g.add(f"think: THINK_TEXT {THINK_CLOSE}")
        else:
            g.add(f"think[lazy]: /(?s:.)*{_regex_escape(THINK_CLOSE)}/")
        start += "think "
    start += f"{_lit(chr(10))}? ({' | '.join(bodies)})"
    lark = "\n".join([start, *g.rules]) + "\n"
    return json.dumps({"grammars": [{"lark_grammar": lark}]})


def _first_error(grammar: str, tokenizer: Any) -> str | None:
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error else None


def _check_schema(schema: Mapping[str, Any], param: str) -> None:
    from llguidance import LLMatcher

    doc = json.loads(_json(schema).removeprefix("%json "))
    error = _first_error(LLMatcher.grammar_from_json_schema(doc), None)
    if error is not None:
        raise GrammarError(f"{param}: the JSON Schema cannot be compiled: {error}", param)


def _check_tools(tools: Sequence[FunctionTool], param: str) -> None:
    """Every tool parameter the grammar inlines as JSON must compile (the rest is text);
    param: where a tool's parameters are, with {i} for its index."""
    for i, tool in enumerate(tools):
        params = tool.parameters
        defs = {key: params[key] for key in ("$defs", "definitions") if key in params}
        for key, schema in (params.get("properties") or {}).items():
            if schema.get("type") in ("string", "boolean", "null") or "const" in schema:
                continue
            doc = dict(schema)
            for name, value in defs.items():
                doc.setdefault(name, value)
            _check_schema(doc, param.format(i=i) + f".properties.{key}")


class GrammarCompiler:
    """Builds and validates output grammars for one model (blocking: run it off the loop).

    tokenizer: the model's llguidance LLTokenizer (special-token references need it), or
    None. special_markup: the markup strings that are special tokens of that tokenizer.
    Grammars already validated are remembered (the same tools and schema recur in agent
    loops), up to cache_size of them.
    """

    def __init__(self, tokenizer: Any = None, special_markup: Collection[str] = (),
                 cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.special_markup = frozenset(special_markup)
        self._validated = lru_cache(maxsize=cache_size)(self._error)

    def _error(self, grammar: str) -> str | None:
        return _first_error(grammar, self.tokenizer)

    def compile(self, fmt: OutputFormat | None, tools: Sequence[FunctionTool],
                tool_choice: ToolChoice, parallel_tool_calls: bool, in_reasoning: bool,
                tools_param: str = "tools[{i}].parameters") -> str | None:
        """The request's grammar (None: unconstrained); GrammarError names the field whose
        schema llguidance cannot compile (tools_param: where a tool's parameters are in the
        request, {i} its index)."""
        grammar = build_grammar(fmt, tools, tool_choice, parallel_tool_calls, in_reasoning,
                                self.special_markup)
        if grammar is None:
            return None
        error = self._validated(grammar)
        if error is None:
            return grammar
        # Find the part to blame, so that the 400 names the field.
        if fmt is not None and fmt.kind == "json_schema":
            _check_schema(fmt.schema, fmt.param)
        _check_tools(tools, tools_param)
        raise GrammarError(f"the output grammar cannot be compiled: {error}", "tool_choice")
