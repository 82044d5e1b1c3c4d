"""examples/agent.py against `baton up examples/demo.yaml` (real processes, the official openai
client): ten arithmetic questions with numbers the demo model never saw in training, each
answered through a calculator call the client runs, at least nine right.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import demo_chats  # noqa: E402
import demo_eval  # noqa: E402

pytestmark = pytest.mark.timeout(420)

def load_agent():
    spec = importlib.util.spec_from_file_location("agent_example", REPO / "examples" / "agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(demo_up):
    return openai.OpenAI(base_url=demo_up["url"], api_key="none", max_retries=0, timeout=120)


@pytest.mark.slow
def test_agent_answers_unseen_arithmetic_through_the_calculator(served):
    agent = load_agent()
    right, log = 0, []
    for question in demo_chats.held_out_questions(seed=11, count=10):
        answer, messages = agent.run_agent(served, "demo", question.text)
        calls = [c["function"] for m in messages for c in m.get("tool_calls", [])]
        result = demo_chats.calculator(question.expression)
        called = any(c["name"] == "calculator" and demo_chats.calculator(
            json.loads(c["arguments"]).get("expression", "")) == result for c in calls)
        ok = called and demo_eval.states_result(answer, result)
        right += ok
        log.append((question.text, calls, answer, ok))
    assert right >= 9, log
