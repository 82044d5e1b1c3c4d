"""Checks of the trained demo model through baton's own engine: greedy generation, the
calculator agent loop on a template-rendered prompt (what the router will send), and the
speculative-decoding figures.

The agent loop here reads the model's tool call from its text with a small parser of the
Nemotron 3 format (the router's own parser belongs to the serving API); the tool result goes
back as a `tool` message rendered by the chat template, exactly as a client's would.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_chats

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams

TOOL_CALL = re.compile(r"<tool_call>\s*<function=([^>\s]+)>\s*(.*?)</function>\s*</tool_call>",
                       re.S)
PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)


def device_error(value: str) -> str | None:
    """Why `value` cannot be the device of the demo scripts (cpu, cuda, cuda:N with such a
    device present), or None when it can."""
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"{value!r}: allowed: cpu, cuda, cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{value!r}, but this torch sees no CUDA device"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"{value!r}, but this torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def make_engine(model, tokenizer, speculative_tokens: int = 0, max_num_seqs: int = 4
                ) -> Engine:
    """A CPU-sized engine over the whole context of `model`."""
    pages = max_num_seqs * (-(-(model.max_model_len + speculative_tokens + 1) // 16)) + 1
    return Engine(model, EngineConfig(page_size=16, num_pages=pages, max_num_seqs=max_num_seqs,
                                      max_batch_tokens=1024, speculative_tokens=speculative_tokens,
                                      base_seed=0), tokenizer)


def generate(engine: Engine, prompt_ids: list[int], max_tokens: int,
             ignore_eos: bool = False) -> list[int]:
    """Greedy output ids of one prompt (eos included when it ends the output)."""
    request_id = f"r{time.monotonic_ns()}"
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    engine.add_request(Request(request_id, list(prompt_ids), sampling))
    out: list[int] = []
    while engine.has_work():
        for event in engine.step():
            if event.request_id == request_id and event.token_id is not None:
                out.append(event.token_id)
    return out


def parse_tool_calls(text: str) -> list[tuple[str, dict[str, str]]]:
    """(function name, {parameter: value}) of every Nemotron 3 tool call in `text`."""
    return [(name, dict(PARAMETER.findall(body))) for name, body in TOOL_CALL.findall(text)]


def states_result(answer: str, result: str) -> bool:
    """Whether `answer` writes the number `result` (as a whole number, not inside another)."""
    return result in re.findall(r"-?\d+(?:\.\d+)?", answer)


@dataclass
class AgentResult:
    question: demo_chats.Question
    expression: str | None
    answer: str

    @property
    def correct(self) -> bool:
        """The call computed the question's expression and the answer states its result."""
        if self.expression is None:
            return False
        result = demo_chats.calculator(self.question.expression)
        return demo_chats.calculator(self.expression) == result and states_result(
            self.answer, result)


def run_agent(engine: Engine, tokenizer, question: demo_chats.Question,
              max_tokens: int = 120) -> AgentResult:
    """One question through the calculator loop, greedy."""
    messages: list[dict] = [{"role": "user", "content": question.text}]
    tools = [demo_chats.CALCULATOR]
    expression = None
    for round_index in range(3):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, tools=tools)
        text = tokenizer.decode(generate(engine, prompt, max_tokens))
        reasoning, _, content = text.rpartition("</think>")
        calls = parse_tool_calls(content)
        if not calls:
            return AgentResult(question, expression, content.strip())
        turn = {"role": "assistant", "content": None, "reasoning_content": reasoning.strip(),
                "tool_calls": []}
        results = []
        for index, (name, arguments) in enumerate(calls):
            call_id = f"call_{round_index}_{index}"
            turn["tool_calls"].append({"id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": arguments}})
            if name == "calculator" and "expression" in arguments:
                expression = arguments["expression"].strip()
                value = demo_chats.calculator(expression)
            else:
                value = f"error: no tool {name!r} with these arguments"
            results.append({"role": "tool", "tool_call_id": call_id, "content": value})
        messages += [turn, *results]
    return AgentResult(question, expression, "")


def speculation_figures(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                        draft_counts=(0, 1, 2)) -> dict[int, dict]:
    """Per draft count K: greedy outputs, decode tokens/s at batch 1 (one request at a time,
    the prompt's prefill excluded), and the MTP acceptance rate (accepted / drafted)."""
    figures = {}
    for k in draft_counts:
        engine = make_engine(model, tokenizer, speculative_tokens=k, max_num_seqs=1)
        generate(engine, prompts[0], 4, ignore_eos=True)  # warm-up
        before = engine.stats()
        outputs, decode_seconds, decoded = [], 0.0, 0
        for prompt in prompts:
            request_id = f"k{k}-{len(outputs)}"
            engine.add_request(Request(request_id, list(prompt), SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
            tokens, first_at = [], None
            while engine.has_work():
                events = engine.step()
                now = time.perf_counter()
                for event in events:
                    if event.token_id is not None:
                        tokens.append(event.token_id)
                if first_at is None and tokens:
                    first_at, first_count = now, len(tokens)
            decode_seconds += time.perf_counter() - first_at
            decoded += len(tokens) - first_count
            outputs.append(tokens)
        after = engine.stats()
        drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
        accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
        figures[k] = {"outputs": outputs, "decode_tokens_per_s": decoded / decode_seconds,
                      "drafted": drafted, "accepted": accepted,
                      "acceptance": accepted / drafted if drafted else None}
    return figures
