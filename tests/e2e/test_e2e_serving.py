"""router -> prefill -> decode with real worker processes, the tiny model and the openai client.

One cluster for the module: a prefill worker, two decode workers (MTP speculation on, two
draft tokens) and a router, started directly as `baton worker` / `baton router` processes.
The test that kills a decode worker runs last.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.workers.text.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "examples" / "tiny"

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture
def cluster(shared_cluster):
    """The session's shared router, prefill and two decode workers (two draft tokens)."""
    return shared_cluster


@pytest.fixture
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CHECKPOINT)


def greedy(client, prompt: list[int], n: int, stream: bool = False) -> list[tuple[int, float]]:
    """(token id, logprob) of n greedy tokens through the router."""
    args = dict(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    if stream:
        tokens, logprobs = [], []
        for chunk in client.completions.create(stream=True, **args):
            lp = chunk.choices[0].logprobs if chunk.choices else None
            if lp is not None:
                tokens += lp.tokens
                logprobs += lp.token_logprobs
    else:
        lp = client.completions.create(**args).choices[0].logprobs
        tokens, logprobs = lp.tokens, lp.token_logprobs
    return [(int(t.removeprefix("token_id:")), p) for t, p in zip(tokens, logprobs)]


def usage_ratios(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("baton_kv_cache_usage_ratio", "baton_ssm_state_slots_usage_ratio"):
            out[family.name] = sum(s.value for s in family.samples)
    return out


def test_every_endpoint_streamed_and_not(client, tokenizer, reference):
    prompt = tokenizer.encode("The quick brown fox")
    ref_ids = [t for t, _, _ in reference(prompt, 8)]
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 8
    assert out.choices[0].text == tokenizer.decode(ref_ids)
    chunks = list(client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tokenizer.decode(ref_ids)
    assert chunks[-1].usage.completion_tokens == 8

    messages = [{"role": "user", "content": "Hello there"}]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    chat_ref = [t for t, _, _ in reference(chat_prompt, 6)]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True})
    assert reply.choices[0].message.content == tokenizer.decode(chat_ref)
    assert reply.usage.prompt_tokens == len(chat_prompt)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}))
    assert streamed == tokenizer.decode(chat_ref)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_bad_requests_against_real_workers(client, e2e):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[5] * e2e.MAX_MODEL_LEN, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                "content": "x"}], n=200)


def test_agent_api_against_real_workers(client, tokenizer, cluster):
    """n > 1, several prompts, tools, the Responses API and /tokenize through real workers
    (nothing here needs the workers to apply a grammar)."""
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                seed=7, extra_body={"ignore_eos": True})
    single = client.completions.create(**args)
    several = client.completions.create(n=3, **args)
    assert [c.index for c in several.choices] == [0, 1, 2]
    # Choice 0 keeps the request's seed; the others get their own.
    assert several.choices[0].text == single.choices[0].text
    assert len({c.text for c in several.choices}) > 1
    assert several.usage.prompt_tokens == single.usage.prompt_tokens
    assert several.usage.completion_tokens == 18
    batch = client.completions.create(model="tiny", prompt=["The quick brown fox", "Hello"],
                                      max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert len(batch.choices) == 2 and batch.usage.completion_tokens == 8
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[weather], max_completion_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    response = client.responses.create(model="tiny", input="Hello there", max_output_tokens=5,
                                       reasoning={"effort": "none"})
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens <= 5
    with httpx.Client() as http:
        counted = http.post(cluster["url"] + "/tokenize",
                            json={"prompt": "The quick brown fox"}).json()
    assert counted["tokens"] == tokenizer.encode("The quick brown fox")


def test_concurrent_requests_equal_the_single_process_engine(client, reference, e2e):
    rng = random.Random(0)
    # Lengths from one token to many KV pages (16 tokens each); ids avoid the specials.
    lengths = [1, 7, 16, 33, 70, 129, 200, 301]
    prompts = [[rng.randrange(5, 512) for _ in range(n)] for n in lengths]
    n_out = 12
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda ip: greedy(client, ip[1], n_out, stream=ip[0] % 2 == 0),
                                enumerate(prompts)))
    compared = 0
    for prompt, got in zip(prompts, results):
        compared += e2e.assert_matches_reference(got, reference(prompt, n_out),
                                             f"prompt of {len(prompt)} tokens")
    assert compared >= len(prompts) * n_out * 3 // 4  # near-ties are rare


def test_seeded_sampling_equals_the_engine_wherever_tokens_are_sampled(client, reference):
    # The prefill worker samples the first token, a decode worker (with MTP drafts) the
    # rest; seeded sampling is keyed on (seed, position), so the tokens are the engine's.
    prompt = list(range(40, 90))
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0.9, seed=1234, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    tokens = [int(t.removeprefix("token_id:")) for t in got.choices[0].logprobs.tokens]
    assert tokens == [t for t, _, _ in reference(prompt, 24, temperature=0.9, seed=1234)]


def test_client_disconnect_frees_slots_on_both_workers(cluster):
    decode_ports = [d.metrics_port for d in cluster["decodes"]]
    body = {"model": "tiny", "prompt": "tell me a very long story", "max_tokens": 4000,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", cluster["url"] +
                                                       "/v1/completions", json=body) as r:
        # One iterator kept open: abandoning httpx's line iterator closes the response.
        lines = r.iter_lines()
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data:")
        busy = [usage_ratios(p) for p in decode_ports]
        assert any(u["baton_kv_cache_usage_ratio"] > 0 and
                   u["baton_ssm_state_slots_usage_ratio"] > 0 for u in busy), busy
    deadline = time.monotonic() + 60
    ports = decode_ports + [cluster["prefill"].metrics_port]
    while True:
        ratios = [usage_ratios(p) for p in ports]
        if all(v == 0 for u in ratios for v in u.values()):
            break
        assert time.monotonic() < deadline, f"slots still held after the client left: {ratios}"
        time.sleep(0.2)  # a bounded poll for the asserted state


@pytest.fixture
def own_cluster(tmp_path, e2e):
    """A cluster of the shared one's shape, for a test that kills or drains a worker."""
    with e2e.running_cluster(tmp_path) as running:
        yield running


def test_decode_worker_killed_mid_stream_continues_on_the_other(own_cluster, reference, e2e):
    cluster = own_cluster
    client = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    rng = random.Random(1)
    prompt = [rng.randrange(5, 512) for _ in range(40)]
    n = 300
    args = dict(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=1,
                stream=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    got: list[tuple[int, float]] = []
    killed = None
    for chunk in client.completions.create(**args):
        lp = chunk.choices[0].logprobs if chunk.choices else None
        if lp is not None:
            got += [(int(t.removeprefix("token_id:")), p)
                    for t, p in zip(lp.tokens, lp.token_logprobs)]
        if killed is None and len(got) >= 10:
            health = httpx.get(cluster["url"] + "/health").json()
            busy = [w["address"] for w in health["workers"]["decode"] if w["inflight"] > 0]
            assert len(busy) == 1, health
            killed = next(d for d in cluster["decodes"] if d.address == busy[0])
            killed.kill()
            killed.proc.wait(timeout=10)
    assert killed is not None and killed.proc.returncode is not None
    # Every token exactly once, equal to the reference: no duplicate and no gap at the seam.
    e2e.assert_matches_reference(got, reference(prompt, n), "stream across a decode worker death")
    assert "retrying on other workers" in cluster["router"].log(200)


def test_draining_decode_worker_finishes_its_stream_and_gets_no_new_work(tmp_path, reference,
                                                                          e2e):
    # One decode worker, so that new work has nowhere else to go. SIGTERM makes it drain.
    with e2e.running_cluster(tmp_path, n_decode=1) as cluster:
        _drain_the_only_decode_worker(cluster, reference, e2e)


def _drain_the_only_decode_worker(cluster, reference, e2e):
    client = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    (survivor,) = cluster["decodes"]
    retries_before = cluster["router"].log(1000).count("retrying on other workers")
    prompt = list(range(100, 130))
    n = 200
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=1, stream=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    got: list[tuple[int, float]] = []
    finish = None
    drained = False
    for chunk in stream:
        lp = chunk.choices[0].logprobs if chunk.choices else None
        if lp is not None:
            got += [(int(t.removeprefix("token_id:")), p)
                    for t, p in zip(lp.tokens, lp.token_logprobs)]
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if not drained and len(got) >= 10 and finish is None:
            drained = True
            survivor.kill(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while httpx.get(cluster["url"] + "/ready").status_code != 503:
                assert time.monotonic() < deadline, "the router still counts the worker ready"
                time.sleep(0.1)  # a bounded poll for the asserted state
            # No new work for a draining worker: with no other decode worker, a 503.
            with pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model="tiny", prompt="new work", max_tokens=2)
            assert info.value.status_code == 503
    assert drained and finish == "length"
    # The stream in flight finished on the draining worker itself, without a retry.
    e2e.assert_matches_reference(got, reference(prompt, n), "stream on a draining worker")
    assert cluster["router"].log(1000).count("retrying on other workers") == retries_before
    assert survivor.proc.wait(timeout=60) == 0
