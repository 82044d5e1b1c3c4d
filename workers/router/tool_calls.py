"""Tool calls in the Nemotron 3 format, parsed from a streaming answer.

The chat template teaches the model to call a function as

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

optionally after some text, one call after another. `ToolCallParser` turns the answer's text
into content pieces and `ToolCallDelta`s, OpenAI's streamed shape: a call's first delta has
its index, id and name, the following ones fragments of `function.arguments`, which
concatenate to the JSON object `{"city": "Paris", "days": 3}` (json.dumps' separators; a
non-streamed answer is the concatenation of the same deltas, so both agree by construction).

Arguments are typed by the function's JSON Schema (`typed_argument`): a string parameter is
its text as it is (streamed as it arrives); integer / number / boolean / null / object /
array parameters are read from their text (JSON, or the Python spelling True / False / None
the template renders); a parameter the schema does not type is JSON if it parses, else the
string. The template writes a value as `\\n{value}\\n` between the tags; one newline on each
side is markup.

Malformed markup is content, never an error: `<tool_call>` not followed by a well-formed
`<function=NAME>` header naming one of the request's tools stays text. Once a header is
complete the call exists (its id and name were streamed); what follows is read leniently: a
missing `</parameter>` or `</function>` ends the value or the call at the next closing tag,
other text between parameters ends the call (and is content), and a call cut off by the end
of the output is closed with the arguments complete so far (a typed value cut off is
dropped, a string value keeps its text), so `arguments` is always a JSON object.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from baton.workers.text.streaming import partial_marker_len

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
MAX_NAME_CHARS = 256

_HEADER = re.compile(rf"\s*<function=([^>\n]{{1,{MAX_NAME_CHARS}}})>")
_PARAMETER = re.compile(rf"<parameter=([^>\n]{{1,{MAX_NAME_CHARS}}})>")
# What ends a parameter's value: its own closing tag, or (the model forgot it) the call's.
_VALUE_ENDS = (PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
# Held back at the end of a streamed string value: a possible start of a closing tag, with
# the newline before it that is markup.
_VALUE_HOLD = _VALUE_ENDS + tuple("\n" + m for m in _VALUE_ENDS)
_BODY_MARKERS = (PARAMETER_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
_PY_LITERALS = {"True": True, "False": False, "None": None}
_SCALARS = {"integer", "number", "boolean", "null", "object", "array"}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a tool call (OpenAI's delta.tool_calls[i])."""

    index: int  # the call's position among this answer's calls
    id: str | None = None  # first delta of a call only
    name: str | None = None  # first delta of a call only
    arguments: str = ""  # a fragment of function.arguments


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _loads(text: str) -> Any:
    """Strict JSON: no NaN / Infinity (json.loads accepts them by default) and no number that
    overflows to infinity, so that json.dumps of the value is JSON again."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _schema_type(schema: Any) -> str | None:
    """The one JSON type a (sub)schema gives a value, if it gives exactly one."""
    if not isinstance(schema, Mapping):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return t
    if t is None and "enum" in schema and isinstance(schema["enum"], list) and schema["enum"] \
            and all(isinstance(v, str) for v in schema["enum"]):
        return "string"
    if t is None and isinstance(schema.get("const"), str):
        return "string"
    return None


def typed_argument(text: str, schema: Any) -> Any:
    """A parameter's value from its text, typed by its JSON Schema (module docstring)."""
    kind = _schema_type(schema)
    if kind == "string":
        return text
    stripped = text.strip()
    if kind in _SCALARS:
        if kind == "boolean" and stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        if kind == "null" and stripped in ("null", "None"):
            return None
        try:
            value = _loads(stripped)
        except (ValueError, RecursionError):  # RecursionError: nested past the C parser's
            return text
        ok = {
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
        }[kind](value)
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value if ok else text
    if stripped in _PY_LITERALS:
        return _PY_LITERALS[stripped]
    try:
        return _loads(stripped)
    except (ValueError, RecursionError):
        return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class _State(enum.Enum):
    TEXT = 1  # content, watching for <tool_call>
    HEADER = 2  # after <tool_call>, before a complete <function=NAME>
    BODY = 3  # inside a function, between parameters
    VALUE = 4  # inside a parameter's value
    AFTER_FUNCTION = 5  # after </function>, expecting </tool_call>


ContentOrCall = str | ToolCallDelta


class ToolCallParser:
    """Content and tool-call deltas from an answer's text, streaming (module docstring).

    functions: name -> the function's `parameters` JSON Schema (the request's tools).
    max_calls: stop parsing after this many complete calls (parallel_tool_calls false: one);
    `done` then says the answer is over.
    """

    def __init__(self, functions: Mapping[str, Any], max_calls: int | None = None,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self._functions = functions
        self._max_calls = max_calls
        self._new_id = new_id
        self._state = _State.TEXT
        self._buf = ""
        self._ws_before_call = ""  # whitespace trimmed off the content before <tool_call>
        self._after_call = False  # content right after a call: leading whitespace dropped
        self.calls = 0  # calls whose header was parsed
        self.done = False
        # The open call: its parameters' schemas, how many arguments it has so far, and the
        # value being read.
        self._properties: Mapping[str, Any] = {}
        self._n_args = 0
        self._key = ""
        self._string_value = False
        self._value_started = False

    # -- helpers -------------------------------------------------------------------------------

    def _arguments(self, fragment: str) -> ToolCallDelta:
        return ToolCallDelta(index=self.calls - 1, arguments=fragment)

    def _key_fragment(self) -> str:
        fragment = ("{" if self._n_args == 0 else ", ") + _dumps(self._key) + ": "
        self._n_args += 1
        return fragment

    def _close_call(self, out: list[ContentOrCall]) -> None:
        out.append(self._arguments("}" if self._n_args else "{}"))

    def _end_call(self) -> None:
        self._state = _State.TEXT
        self._after_call = True
        if self._max_calls is not None and self.calls >= self._max_calls:
            self.done = True

    # -- streaming -----------------------------------------------------------------------------

    def feed(self, text: str) -> list[ContentOrCall]:
        """Add answer text; return the content pieces and call deltas it settles, in order."""
        if self.done:
            return []
        self._buf += text
        out: list[ContentOrCall] = []
        while not self.done and self._step(out):
            pass
        return out

    def _step(self, out: list[ContentOrCall]) -> bool:
        """Advance as far as the buffer allows; False when it needs more text."""
        state = self._state
        buf = self._buf
        if state is _State.TEXT:
            if self._after_call:
                buf = self._buf = buf.lstrip()
                if not buf:
                    return False
                self._after_call = False
            at = buf.find(TOOL_CALL_OPEN)
            if at >= 0:
                before = buf[:at]
                content = before.rstrip()
                if content:
                    out.append(content)
                self._ws_before_call = before[len(content):]
                self._buf = buf[at + len(TOOL_CALL_OPEN):]
                self._state = _State.HEADER
                return True
            # Hold back a possible start of <tool_call> and trailing whitespace (trimmed off
            # if a call follows).
            keep = len(buf) - partial_marker_len(buf, (TOOL_CALL_OPEN,))
            keep = len(buf[:keep].rstrip())
            if keep:
                out.append(buf[:keep])
                self._buf = buf[keep:]
            return False
        if state is _State.HEADER:
            m = _HEADER.match(buf)
            if m is not None:
                name = m.group(1).strip()
                if name not in self._functions:
                    self._malformed_header(out)
                    return True
                self.calls += 1
                params = self._functions[name]
                props = params.get("properties") if isinstance(params, Mapping) else None
                self._properties = props if isinstance(props, Mapping) else {}
                self._n_args = 0
                out.append(ToolCallDelta(index=self.calls - 1, id=self._new_id(), name=name))
                self._buf = buf[m.end():]
                self._state = _State.BODY
                return True
            rest = buf.lstrip()
            could_become = (FUNCTION_OPEN.startswith(rest) or (
                rest.startswith(FUNCTION_OPEN) and ">" not in rest and "\n" not in rest
                and len(rest) <= len(FUNCTION_OPEN) + MAX_NAME_CHARS))
            if could_become:
                return False
            self._malformed_header(out)
            return True
        if state is _State.BODY:
            rest = buf.lstrip()
            m = _PARAMETER.match(rest)
            if m is not None:
                self._key = m.group(1).strip()
                schema = self._properties.get(self._key)
                self._string_value = _schema_type(schema) == "string"
                self._value_started = False
                if self._string_value:
                    out.append(self._arguments(self._key_fragment() + '"'))
                self._buf = rest[m.end():]
                self._state = _State.VALUE
                return True
            if rest.startswith(FUNCTION_CLOSE):
                self._close_call(out)
                self._buf = rest[len(FUNCTION_CLOSE):]
                self._state = _State.AFTER_FUNCTION
                return True
            if rest.startswith(TOOL_CALL_CLOSE):
                self._close_call(out)
                self._buf = rest[len(TOOL_CALL_CLOSE):]
                self._end_call()
                return True
            if not rest or any(marker.startswith(rest) for marker in _BODY_MARKERS) or (
                    rest.startswith(PARAMETER_OPEN) and ">" not in rest and "\n" not in rest
                    and len(rest) <= len(PARAMETER_OPEN) + MAX_NAME_CHARS):
                return False
            # Text that is no markup inside a call: the call ends, the text is content.
            self._close_call(out)
            self._buf = rest
            self._end_call()
            self._after_call = False
            return True
        if state is _State.VALUE:
            if not self._value_started:
                if not buf:
                    return False
                if buf.startswith("\n"):
                    buf = self._buf = buf[1:]
                self._value_started = True
            ends = [(i, marker) for marker in _VALUE_ENDS if (i := buf.find(marker)) >= 0]
            if ends:
                at, marker = min(ends)
                value = buf[:at]
                if value.endswith("\n"):
                    value = value[:-1]
                self._emit_value(value, out, final=True)
                self._buf = buf[at + len(marker):]
                if marker == PARAMETER_CLOSE:
                    self._state = _State.BODY
                elif marker == FUNCTION_CLOSE:
                    self._close_call(out)
                    self._state = _State.AFTER_FUNCTION
                else:
                    self._close_call(out)
                    self._end_call()
                return True
            if self._string_value:
                keep = len(buf) - partial_marker_len(buf, _VALUE_HOLD)
                if keep:
                    self._emit_value(buf[:keep], out, final=False)
                    self._buf = buf[keep:]
            return False
        # AFTER_FUNCTION
        rest = buf.lstrip()
        if rest.startswith(TOOL_CALL_CLOSE):
            self._buf = rest[len(TOOL_CALL_CLOSE):]
            self._end_call()
            return True
        if TOOL_CALL_CLOSE.startswith(rest):
            return False
        # No </tool_call>: the call is over anyway; what follows is content.
        self._buf = rest
        self._end_call()
        self._after_call = False
        return True

    def _malformed_header(self, out: list[ContentOrCall]) -> None:
        # Not a call after all: the tag and what follows are content, scanned again for a
        # later <tool_call>.
        out.append(self._ws_before_call + TOOL_CALL_OPEN)
        self._ws_before_call = ""
        self._state = _State.TEXT

    def _emit_value(self, text: str, out: list[ContentOrCall], final: bool) -> None:
        if self._string_value:
            fragment = _dumps(text)[1:-1] if text else ""
            if final:
                fragment += '"'
            if fragment:
                out.append(self._arguments(fragment))
            return
        value = typed_argument(text, self._properties.get(self._key))
        out.append(self._arguments(self._key_fragment() + _dumps(value)))

    def finish(self) -> list[ContentOrCall]:
        """The answer ended: content still held back, and the open call closed."""
        out: list[ContentOrCall] = []
        if self.done:
            return out
        while self._step(out):
            if self.done:
                return out
        buf, self._buf = self._buf, ""
        state = self._state
        if state is _State.TEXT:
            if buf and not self._after_call:
                out.append(buf)
        elif state is _State.HEADER:
            out.append(self._ws_before_call + TOOL_CALL_OPEN + buf)
        elif state is _State.VALUE:
            if self._string_value:
                if buf.endswith("\n"):
                    buf = buf[:-1]
                self._emit_value(buf, out, final=True)
            self._close_call(out)
        elif state is _State.BODY:
            self._close_call(out)
        self._state = _State.TEXT
        return out
