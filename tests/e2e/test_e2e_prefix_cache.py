"""Multi-turn sessions through `baton up` (real processes, the official openai client): a
10-turn chat whose history grows by a few hundred tokens a turn is served from the prefix
caches (the decode worker's, which then prefills the rest itself; and the prefill worker's
when the decode worker lacks too much and the prefill worker is not far behind), equals the
same chat with the cache off, and moves a fraction of the state; a history that re-renders
differently still hits where it last agrees.

Token-level turns: /v1/completions with token-id prompts, and the answer's token ids from
`return_tokens_as_token_ids` (the chat template is irrelevant to what the caches hold).
"""

from __future__ import annotations

import contextlib
import random
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.workers.local import LocalDeployment, free_port

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "examples" / "tiny"
# Tokens appended each turn (a user message or a tool result): a few hundred, so the decode
# worker, which holds the rest, prefills them itself (localPrefillMaxTokens is 512). An 11th
# turn appends more than that, but the prefill worker saw only turn 1 (it would compute over
# 1.3x what the decode worker lacks): the decode worker prefills it too. A 12th request
# branches off turn 1 with BRANCH new tokens: both hold turn 1, so the prefill worker computes
# it from its own hit and sends only what the decode worker lacks.
GROWTH = [300, 250, 400, 200, 350, 450, 300, 250, 400]
LONG_TURN = 700
BRANCH = 700
FIRST_PROMPT = 200
ANSWER = 8

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SPEC = """\
apiVersion: baton.dev/v1alpha1
kind: Model
metadata: {{name: tiny, namespace: default}}
spec:
  source: {{uri: "file://{checkpoint}"}}
  engine:
    maxModelLen: 4096
    kvPageSize: 16
    dtype: float32
    prefixCache: {{enabled: {enabled}}}
  router: {{requestTimeoutSeconds: 120, transferTimeoutSeconds: 30}}
  prefill:
    maxBatchTokens: 1024
    pools: [{{name: local, minReplicas: 1, maxReplicas: 1}}]
  decode:
    maxConcurrency: 4
    speculativeTokens: 1
    pools: [{{name: local, minReplicas: 1, maxReplicas: 1}}]
"""


@contextlib.contextmanager
def deployment(tmp_path: Path, enabled: bool):
    spec = tmp_path / f"tiny-{'on' if enabled else 'off'}.yaml"
    spec.write_text(SPEC.format(checkpoint=CHECKPOINT, enabled=str(enabled).lower()))
    up = LocalDeployment(spec, port=free_port(), run_dir=tmp_path / spec.stem,
                         cache_memory_bytes=64 << 20)
    try:
        up.start()
        up.wait_ready(240)
        yield up
    finally:
        up.stop()


def metric(up: LocalDeployment, worker: str, name: str, **labels: str) -> float:
    (child,) = [c for c in up.children if c.name == worker]
    with urllib.request.urlopen(f"http://127.0.0.1:{child.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def run_session(up: LocalDeployment):
    """The turns of one chat: each appends its answer and the next message to the history
    (so a run with other answers builds other histories)."""
    client = openai.OpenAI(base_url=up.base_url + "/v1", api_key="none", max_retries=0)
    rng = random.Random(2026)
    history = [rng.randrange(3, 500) for _ in range(FIRST_PROMPT)]
    out = []
    growth = [*GROWTH, LONG_TURN]
    first = list(history)
    for t in range(len(growth) + 2):
        if t == len(growth) + 1:  # the branch off turn 1
            history = first + out[0]["ids"] + [rng.randrange(3, 500) for _ in range(BRANCH)]
        sent = metric(up, "prefill", "baton_state_transfer_bytes_total")
        answer = client.completions.create(
            model="tiny", prompt=history, max_tokens=ANSWER, temperature=0, logprobs=2,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        lp = answer.choices[0].logprobs
        ids = [int(tok.removeprefix("token_id:")) for tok in lp.tokens]
        margins = [sorted(top.values(), reverse=True)[:2] for top in lp.top_logprobs]
        out.append({
            "prompt": list(history), "ids": ids, "logprobs": list(lp.token_logprobs),
            "margins": [a - b for a, b in margins],
            "cached": answer.usage.prompt_tokens_details.cached_tokens,
            "sent": metric(up, "prefill", "baton_state_transfer_bytes_total") - sent})
        if t < len(growth):
            history = history + ids + [rng.randrange(3, 500) for _ in range(growth[t])]
    return client, out


def test_ten_turns_hit_the_caches_equal_the_cache_off_run_and_move_little(tmp_path):
    with deployment(tmp_path, enabled=True) as up:
        client, hot = run_session(up)
        local = metric(up, "decode", "baton_local_prefills_total")
        # A re-rendered history: the last answer comes back different (a template that strips
        # reasoning, text that re-tokenizes otherwise). It still hits at that prompt's end.
        last = hot[10]
        rerendered = last["prompt"] + [(i + 1) % 500 or 3 for i in last["ids"]] + [7] * 40
        again = client.completions.create(model="tiny", prompt=rerendered, max_tokens=2,
                                          temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == len(last["prompt"])
        for worker in ("prefill", "decode"):
            assert metric(up, worker, "baton_prefix_cache_hit_tokens_total") > 0
        saved = metric(up, "decode", "baton_state_transfer_saved_bytes_total")
    with deployment(tmp_path, enabled=False) as up:
        _, cold = run_session(up)
        assert metric(up, "decode", "baton_prefix_cache_hit_tokens_total") == 0

    ten, remote = hot[:10], hot[11]
    # From turn 2 on, the caches served at least 90% of the previous turn's prompt + answer.
    for t in range(1, len(ten)):
        previous = len(ten[t - 1]["prompt"]) + len(ten[t - 1]["ids"])
        assert ten[t]["cached"] >= 0.9 * previous, (t, ten[t]["cached"], previous)
    assert ten[0]["cached"] == 0 and all(turn["cached"] == 0 for turn in cold)
    # Turns 2..11 were prefilled by the decode worker itself (the 11th because the prefill
    # worker, which saw only turn 1, lagged too far); the branch by the prefill worker, from
    # its own cache (turn 1's prompt) and sending only the KV the decode worker lacked (from
    # turn 1's prompt + answer on), with the Mamba state.
    assert local == len(GROWTH) + 1
    assert hot[10]["cached"] >= len(hot[9]["prompt"]) and hot[10]["sent"] == 0
    assert remote["cached"] == FIRST_PROMPT
    assert 0 < remote["sent"] < cold[11]["sent"], (remote["sent"], cold[11]["sent"])
    # Equal to the cache-off run: the same greedy tokens wherever the cache-off run's margin is
    # clear (until a near-tie lets them part), logprobs within 1e-4.
    compared = 0
    for t, (h, c) in enumerate(zip(hot, cold)):
        if h["prompt"] != c["prompt"]:
            break  # a near-tie parted the histories earlier
        for i, (a, b) in enumerate(zip(h["ids"], c["ids"])):
            if a != b:
                assert c["margins"][i] <= 1e-3, (t, i, a, b, c["margins"][i])
                break
            assert abs(h["logprobs"][i] - c["logprobs"][i]) <= 1e-4, (t, i)
            compared += 1
    assert compared >= ANSWER * 9, compared
    # Turns 2..10 moved at most 30% of the state the cache-off run moved.
    hot_bytes = sum(t["sent"] for t in ten[1:])
    cold_bytes = sum(t["sent"] for t in cold[1:10])
    assert cold_bytes > 0 and hot_bytes <= 0.3 * cold_bytes, (hot_bytes, cold_bytes)
    assert saved > 0
    print(f"prefix cache over 10 turns: transfer {hot_bytes} vs {cold_bytes} bytes "
          f"({hot_bytes / cold_bytes:.1%}); cached per turn {[t['cached'] for t in hot]}; "
          f"the branch off turn 1 sent {remote['sent']} of {cold[11]['sent']} bytes")


def test_choices_cost_one_prefill_and_sessions_keep_their_decode_worker(tmp_path):
    """Two decode workers. n = 3: choice 0 is prefilled, and choices 1 and 2, sent after its
    first token with the same cache key, find the whole prompt on choice 0's decode worker:
    no prefill at all. A session's prompt_cache_key brings its next turn back to the decode
    worker that served it even when nothing of the prompt is shared."""
    spec = tmp_path / "two-decode.yaml"
    spec.write_text(SPEC.format(checkpoint=CHECKPOINT, enabled="true").replace(
        "maxConcurrency: 4\n    speculativeTokens: 1\n"
        "    pools: [{name: local, minReplicas: 1, maxReplicas: 1}]",
        "maxConcurrency: 4\n    speculativeTokens: 1\n"
        "    pools: [{name: local, minReplicas: 2, maxReplicas: 2}]"))
    up = LocalDeployment(spec, port=free_port(), run_dir=tmp_path / "run",
                         cache_memory_bytes=64 << 20)
    try:
        up.start()
        up.wait_ready(240)
        client = openai.OpenAI(base_url=up.base_url + "/v1", api_key="none", max_retries=0)
        rng = random.Random(7)

        def served(total: float | None = None) -> dict[str, float]:
            """Successes per decode worker (counted as their stream ends, a moment after the
            client has the answer: with total, until they add up to it)."""
            deadline = time.monotonic() + 60
            while True:
                counts = {c.name: metric(up, c.name, "baton_requests_total", outcome="success")
                          for c in up.children if c.name.startswith("decode")}
                if total is None or sum(counts.values()) >= total or (
                        time.monotonic() > deadline):
                    return counts
                time.sleep(0.05)  # a bounded poll: the caller asserts the counts

        prefilled = metric(up, "prefill", "baton_requests_total", outcome="success")
        answer = client.completions.create(
            model="tiny", prompt=[rng.randrange(3, 500) for _ in range(300)], max_tokens=4,
            n=3, temperature=1.0, seed=5)
        assert len(answer.choices) == 3
        assert metric(up, "prefill", "baton_requests_total",
                      outcome="success") == prefilled + 1
        assert sum(metric(up, c.name, "baton_local_prefills_total") for c in up.children
                   if c.name.startswith("decode")) == 2
        before = served(3)
        for session in ("agent-a", "agent-b", "agent-c"):
            for _turn in range(2):
                client.completions.create(
                    model="tiny", prompt=[rng.randrange(3, 500) for _ in range(60)],
                    max_tokens=2, temperature=0, extra_body={"prompt_cache_key": session})
            after = served(sum(before.values()) + 2)
            # Both turns on one decode worker, though the prompts share nothing.
            assert sorted(after[n] - before[n] for n in after) == [0, 2], (session, after)
            before = after
    finally:
        up.stop()
