"""Seeded agent sessions: a system prompt with tool definitions shared by every session, then
turns that each append a user message or a tool result, as an agent loop resends the whole
conversation every turn.

    python benchmarks/agent/session_trace.py [--sessions 4] [--turns 10] [--seed 7]
        [--out trace.json]

A trace holds token ids only (what the caches see; the chat template does not matter at this
level): the shared system prompt and, per session and turn, the message appended to the
history. The answers are not in the trace: a replay (bench_agent.py) appends each answer the
model gave before the next message. The same seed gives the same trace.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Token ids drawn for text: above the tokenizer's special ids, within the smallest vocabulary
# a benchmark model has.
TOKEN_RANGE = (3, 500)


@dataclass(frozen=True)
class Turn:
    kind: str
    """"user" (a message) or "tool" (a tool result)."""
    tokens: list[int]


@dataclass(frozen=True)
class Session:
    turns: list[Turn]
    """The first turn's message follows the system prompt; each later one follows the
    previous turn's answer."""


@dataclass(frozen=True)
class Trace:
    seed: int
    system: list[int]
    """The shared system prompt with the tool definitions."""
    sessions: list[Session] = field(default_factory=list)
    answer_tokens: int = 16
    """Tokens each answer has (greedy, eos ignored)."""

    def new_tokens(self, turn: int) -> int:
        """Tokens appended in turn (the first turn also sends the system prompt)."""
        own = sum(len(s.turns[turn].tokens) for s in self.sessions)
        return own + (len(self.system) * len(self.sessions) if turn == 0 else 0)

    def longest_history(self) -> int:
        """Tokens of the longest session's last prompt plus its answer."""
        return max(len(self.system) + sum(len(t.tokens) for t in s.turns)
                   + self.answer_tokens * len(s.turns) for s in self.sessions)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Trace:
        obj = json.loads(text)
        sessions = [Session([Turn(**t) for t in s["turns"]]) for s in obj["sessions"]]
        return cls(obj["seed"], obj["system"], sessions, obj["answer_tokens"])


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """Lengths skewed to the short end, as most messages and tool results are."""
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def generate(sessions: int, turns: int, seed: int, system_tokens: int = 1500,
             user: tuple[int, int] = (200, 800), tool: tuple[int, int] = (200, 4000),
             tool_share: float = 0.6, answer_tokens: int = 16,
             max_history: int | None = None) -> Trace:
    """N sessions x M turns. The first turn of a session is a user message; later turns are a
    tool result with probability tool_share, else a user message, of lengths drawn from
    `tool` / `user` (log-uniform). With max_history, tool results are cut so that no
    session's history (with its answers) outgrows it."""
    for name, value, low in (("sessions", sessions, 1), ("turns", turns, 1),
                             ("system_tokens", system_tokens, 0),
                             ("answer_tokens", answer_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    for name, (low, high) in (("user", user), ("tool", tool)):
        if not 1 <= low <= high:
            raise ValueError(f"{name}={(low, high)!r} must be (low, high) with 1 <= low <= high")
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(*TOKEN_RANGE) for _ in range(n)]  # noqa: E731
    system = draw(system_tokens)
    out = []
    for _ in range(sessions):
        history = system_tokens
        session = []
        for t in range(turns):
            kind = "tool" if t > 0 and rng.random() < tool_share else "user"
            n = _log_uniform(rng, *(tool if kind == "tool" else user))
            if max_history is not None:
                room = max_history - history - answer_tokens * (turns - t)
                if room < 1:
                    raise ValueError(f"max_history={max_history} cannot hold {turns} turns of "
                                     f"at least one token after a {system_tokens}-token system "
                                     "prompt")
                n = max(1, min(n, room - (turns - t - 1)))
            session.append(Turn(kind, draw(n)))
            history += n + answer_tokens
        out.append(Session(session))
    return Trace(seed, system, out, answer_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--max-history", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout)")
    args = p.parse_args(argv)
    try:
        trace = generate(args.sessions, args.turns, args.seed, args.system_tokens,
                         answer_tokens=args.answer_tokens, max_history=args.max_history)
    except ValueError as e:
        p.error(str(e))
    text = trace.to_json()
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"{args.out}: {args.sessions} sessions x {args.turns} turns, longest history "
              f"{trace.longest_history()} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
