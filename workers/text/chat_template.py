"""The Nemotron 3 chat format, as the jinja2 chat template baton's checkpoints ship.

One template renders every conversation the router sends to a model and every conversation the
demo model was trained on, so what the model saw in training is exactly what it is served:

    <|im_start|>system
    {system prompt}

    # Tools

    You have access to the following functions:

    <tools>
    <function>
    <name>calculator</name>
    <description>...</description>
    <parameters>
    <parameter>
    <name>expression</name>
    <type>string</type>
    </parameter>
    <required>["expression"]</required>
    </parameters>
    </function>
    </tools>
    ... (how to call, see TOOLS_FOOTER) <|im_end|>
    <|im_start|>user
    What is 3 + 4?<|im_end|>
    <|im_start|>assistant
    <think></think><tool_call>
    <function=calculator>
    <parameter=expression>
    3 + 4
    </parameter>
    </function>
    </tool_call>
    <|im_end|>
    <|im_start|>user
    <tool_response>
    7
    </tool_response>
    <|im_end|>
    <|im_start|>assistant
    <think>

Rules the template follows (those of NVIDIA's Nemotron 3 template):
- A system turn is always rendered (empty without a system message); tool definitions follow
  the system prompt inside it.
- Assistant turns carry their reasoning as `<think>\\n...\\n</think>\\n` before the content
  (from `reasoning_content`, or `<think>` markup already in the content) and `<think></think>`
  when they have none. Reasoning of assistant turns before the last user turn is dropped
  (only `<think></think>` stays): a history re-renders differently from what was generated,
  which the prefix cache must survive.
- `tool_calls` (OpenAI shape, with `function.arguments` as a mapping; the router parses the
  JSON string first) become `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...`:
  strings as they are, mappings and lists as JSON, other scalars as Python prints them.
- Consecutive `tool` messages share one user turn, each in `<tool_response>...</tool_response>`.
- The generation prompt opens the assistant turn with `<think>\\n`, or with `<think></think>`
  when `enable_thinking` is false.

Written with explicit whitespace control only, so that it renders the same with and without
trim_blocks / lstrip_blocks (transformers renders with both on).
"""

from __future__ import annotations

TOOLS_FOOTER = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:"
    "\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n"
    "value_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second "
    "parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is "
    "no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


def _jinja_string(text: str) -> str:
    """text as a jinja2 string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "'" + escaped + "'"


# A value inside <parameter=...>: strings as they are, mappings and lists as JSON, other
# scalars as Python prints them (True, False, None, 3.5).
_VALUE = (
    "{%- macro render_value(v) -%}"
    "{%- if v is string -%}{{- v -}}"
    "{%- elif v is mapping or (v is iterable and v is not string) -%}{{- v | tojson -}}"
    "{%- else -%}{{- v | string -}}{%- endif -%}"
    "{%- endmacro -%}"
)

_TOOLS = (
    "{%- macro render_tools(tools) -%}"
    "{{- '# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' -}}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool.function if tool.function is defined else tool -%}"
    "{{- '\\n<function>\\n<name>' ~ fn.name ~ '</name>' -}}"
    "{%- if fn.description is defined and fn.description -%}"
    "{{- '\\n<description>' ~ (fn.description | trim) ~ '</description>' -}}"
    "{%- endif -%}"
    "{{- '\\n<parameters>' -}}"
    "{%- set params = fn.parameters if fn.parameters is defined and fn.parameters else {} -%}"
    "{%- if params.properties is defined and params.properties -%}"
    "{%- for pname, pfields in params.properties | dictsort -%}"
    "{{- '\\n<parameter>\\n<name>' ~ pname ~ '</name>' -}}"
    "{%- if pfields.type is defined -%}"
    "{%- if pfields.type is string -%}{{- '\\n<type>' ~ pfields.type ~ '</type>' -}}"
    "{%- else -%}{{- '\\n<type>' ~ (pfields.type | tojson) ~ '</type>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- if pfields.description is defined and pfields.description -%}"
    "{{- '\\n<description>' ~ (pfields.description | trim) ~ '</description>' -}}"
    "{%- endif -%}"
    "{%- for key in ['enum', 'items', 'properties', 'required', 'anyOf'] -%}"
    "{%- if key in pfields -%}"
    "{{- '\\n<' ~ key ~ '>' ~ (pfields[key] | tojson) ~ '</' ~ key ~ '>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '\\n</parameter>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if params.required is defined and params.required -%}"
    "{{- '\\n<required>' ~ (params.required | tojson) ~ '</required>' -}}"
    "{%- endif -%}"
    "{{- '\\n</parameters>\\n</function>' -}}"
    "{%- endfor -%}"
    "{{- '\\n</tools>' -}}"
    "{{- " + _jinja_string(TOOLS_FOOTER) + " -}}"
    "{%- endmacro -%}"
)

# An assistant turn's text before its tool calls: reasoning first, `<think></think>` when it
# has none, earlier turns' reasoning dropped.
_ASSISTANT = (
    "{%- macro render_assistant(message, truncate) -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is string"
    " and message.reasoning_content -%}"
    "{%- set content = '<think>\\n' ~ (message.reasoning_content | trim) ~ '\\n</think>\\n'"
    " ~ (content | trim) -%}"
    "{%- elif '<think>' not in content and '</think>' not in content -%}"
    "{%- set content = '<think></think>' ~ (content | trim) -%}"
    "{%- endif -%}"
    "{%- if truncate and '</think>' in content -%}"
    "{%- set content = '<think></think>' ~ (content.split('</think>')[-1] | trim) -%}"
    "{%- endif -%}"
    "{{- content | trim -}}"
    "{%- endmacro -%}"
)

NEMOTRON3_CHAT_TEMPLATE = (
    _VALUE
    + _TOOLS
    + _ASSISTANT
    + "{%- set ns = namespace(last_user=-1, system='') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set ns.system = messages[0].content if messages[0].content is string else '' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n' ~ (ns.system | trim) -}}"
    "{%- if tools is defined and tools -%}"
    "{%- if ns.system | trim -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- render_tools(tools) -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{{- render_assistant(m, loop.index0 < ns.last_user) -}}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}"
    "{{- '\\n' -}}"
    "{%- for call in m.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '<tool_call>\\n<function=' ~ fn.name ~ '>\\n' -}}"
    "{%- if fn.arguments is defined and fn.arguments is mapping -%}"
    "{%- for key, value in fn.arguments.items() -%}"
    "{{- '<parameter=' ~ key ~ '>\\n' ~ render_value(value) ~ '\\n</parameter>\\n' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '</function>\\n</tool_call>\\n' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' -%}"
    "{{- '<|im_start|>user\\n' -}}"
    "{%- endif -%}"
    "{{- '<tool_response>\\n' ~ (m.content if m.content is string else '') ~"
    " '\\n</tool_response>\\n' -}}"
    "{%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ ((m.content if m.content is string else '') | trim)"
    " ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<|im_start|>assistant\\n<think></think>' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
