"""An agent loop against `baton up`: the model calls a calculator, the tool runs here, the
result goes back, the model answers.

    make demo                                   # in another shell: serves examples/demo/
    .venv/bin/python examples/agent.py "What is 1234 times 5678?"

It speaks the OpenAI API with the official client: the tool is declared in the request
(`tools`), the model's answer carries `tool_calls`, each call is run locally and its result sent
back as a `tool` message, and the loop ends with the model's final answer. The demo model was
trained on exactly this tool (tools/demo_chats.py renders its training chats with CALCULATOR),
so it calls it for arithmetic questions.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return its value.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "An arithmetic expression with + - * / and parentheses, "
                                   "for example 12 * (3 + 4)",
                },
            },
            "required": ["expression"],
        },
    },
}

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + - * /, parentheses) as text: integers
    without a decimal point, other values rounded to 6 decimals; a message on bad input."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError("only numbers, + - * / and parentheses are allowed")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError) as err:
        return f"error: {err.msg if isinstance(err, SyntaxError) else err}"
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)
    return str(result) if isinstance(result, int) else f"{result:.6f}".rstrip("0").rstrip(".")


TOOLS = {"calculator": calculator}


def run_agent(client, model: str, question: str, max_rounds: int = 4,
              max_tokens: int = 200) -> tuple[str, list[dict]]:
    """Asks `question`, runs every tool call the model makes, and returns the final answer and
    the conversation. Greedy (temperature 0), so the same question gives the same answer."""
    messages: list[dict] = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[CALCULATOR], temperature=0,
            max_tokens=max_tokens).choices[0].message
        calls = reply.tool_calls or []
        turn = {"role": "assistant", "content": reply.content}
        # The reasoning goes back too (the chat template keeps it until the next user turn).
        reasoning = (reply.model_extra or {}).get("reasoning_content")
        if reasoning:
            turn["reasoning_content"] = reasoning
        if calls:
            turn["tool_calls"] = [c.model_dump() for c in calls]
        messages.append(turn)
        if not calls:
            return reply.content or "", messages
        for call in calls:
            tool = TOOLS.get(call.function.name)
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as err:
                result = f"error: arguments are not JSON ({err})"
            else:
                result = (tool(**arguments) if tool is not None and isinstance(arguments, dict)
                          else f"error: no tool {call.function.name!r}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise RuntimeError(f"no final answer after {max_rounds} rounds: {messages}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="What is 1234 times 5678?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--verbose", action="store_true", help="print every message")
    args = parser.parse_args(argv)
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key="none")
    answer, messages = run_agent(client, args.model, args.question)
    if args.verbose:
        for message in messages:
            print(json.dumps(message), file=sys.stderr)
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
