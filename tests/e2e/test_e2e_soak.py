"""Mixed traffic that users really send, for a while, through router -> prefill -> 2 decode
workers: completions and chat, streamed and not, random sampling, bad parameters, clients that
disconnect mid-stream and clients that give up before the answer.

What must hold afterwards (the guide's "loses nothing"): every answer was well formed (an
OpenAI body, a whole SSE stream, or an OpenAI error with a 4xx status; never a 5xx), the
router's outcome counters agree with what the clients saw, every cache slot and page on every
worker is free again, no process died, and no process logged an error or a warning. Then the
same traffic while one of the two decode workers drains (SIGTERM) or dies (SIGKILL), or one
of two prefill workers dies: no client sees an error in any case.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

SOAK_SECONDS = 12.0
SOAK_LIMIT_S = 150.0
CONCURRENCY = 16
WORDS = ["hello", "world", "mamba", "state", "token", "x", "the", "decode", "é", "東京"]

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _metrics(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _router_outcomes(url: str) -> Counter:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "baton_requests_total" and s.labels.get("role") == "router":
                out[s.labels["outcome"]] += s.value
    return out


def _request(rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, expected to be refused) of one random request."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
    body: dict = {"model": "tiny", "max_tokens": rng.randint(1, 40),
                  "temperature": rng.choice([0, 0.8, 1.5]), "seed": rng.randint(0, 10**6)}
    if rng.random() < 0.5:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
        if rng.random() < 0.3:
            body["chat_template_kwargs"] = {"enable_thinking": rng.random() < 0.5}
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
    else:
        path, body["prompt"] = "/v1/completions", text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["e", "lo", "\n", "the"], 2)
    if rng.random() < 0.2:
        body["top_p"], body["top_k"] = rng.choice([0.5, 1.0]), rng.choice([5, 50])
    bad = rng.random() < 0.12
    if bad:
        key, value = rng.choice([("max_tokens", -3), ("temperature", -1), ("model", "nope"),
                                 ("top_p", 2.0), ("n", 0), ("max_tokens", 10**7)])
        body[key] = value
    return path, body, bad


def _check_error_body(reply: httpx.Response) -> None:
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["message"], reply.text
    assert isinstance(error["type"], str), reply.text


def _shed(reply: httpx.Response, seen: Counter) -> bool:
    """A 429 from a full router queue: counted, checked, and not a failure."""
    if reply.status_code != 429:
        return False
    assert float(reply.headers["retry-after"]) > 0, reply.headers
    _check_error_body(reply)
    seen["shed"] += 1
    return True


async def _one(http: httpx.AsyncClient, url: str, rng: random.Random, seen: Counter) -> None:
    path, body, bad = _request(rng)
    style = rng.choices(["plain", "stream", "disconnect", "give-up"], [4, 4, 1, 1])[0]
    if style in ("stream", "disconnect"):
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        async with http.stream("POST", url + path, json=body) as reply:
            if reply.status_code != 200:
                await reply.aread()
                if not bad and _shed(reply, seen):
                    return
                assert 400 <= reply.status_code < 500 and bad, (reply.status_code, body)
                _check_error_body(reply)
                seen["refused"] += 1
                return
            assert not bad, body
            events, done = [], False
            async for line in reply.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: "), line
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                events.append(event)
                if style == "disconnect" and len(events) >= 2:
                    seen["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
            assert done, events[-3:]
            finishes = [c["finish_reason"] for e in events for c in e["choices"]
                        if c.get("finish_reason")]
            assert finishes in (["stop"], ["length"]), events[-3:]
            if body.get("stream_options"):
                assert events[-1]["usage"]["completion_tokens"] >= 1, events[-1]
            seen["completed"] += 1
        return
    timeout = rng.uniform(0.02, 0.2) if style == "give-up" else 120.0
    try:
        reply = await http.post(url + path, json=body, timeout=timeout)
    except httpx.TimeoutException:
        seen["gave up"] += 1
        if bad:  # the router may refuse it after the client has left: counted, never seen
            seen["gave up on a bad request"] += 1
        return
    if bad:
        assert 400 <= reply.status_code < 500, (reply.status_code, body, reply.text)
        _check_error_body(reply)
        seen["refused"] += 1
        return
    if _shed(reply, seen):
        return
    assert reply.status_code == 200, (reply.status_code, body, reply.text)
    answer = reply.json()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    assert answer["usage"]["completion_tokens"] >= 1, answer
    seen["completed"] += 1
    if style == "give-up":
        seen["gave up but completed"] += 1


def _enough(seen: Counter) -> bool:
    """The volume every soak asserts on: a busy machine takes longer to reach it, never less."""
    return seen["completed"] > 50 and seen["refused"] > 5 and seen["disconnected"] > 2


async def _soak(url: str, concurrency: int = CONCURRENCY, enough=_enough) -> Counter:
    """Traffic for at least SOAK_SECONDS (a worker is lost or drained a few seconds in) and
    until `enough(seen)`; SOAK_LIMIT_S only bounds a hang."""
    rng = random.Random(20261123)
    seen: Counter = Counter()
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        while (time.monotonic() < start + SOAK_SECONDS or not enough(seen)) and \
                time.monotonic() < start + SOAK_LIMIT_S:
            while len(tasks) < concurrency:
                tasks.add(asyncio.create_task(_one(http, url, rng, seen)))
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failed check fails the test here
        for task in asyncio.as_completed(tasks):
            await task
    return seen


def test_mixed_traffic_loses_nothing(shared_cluster):
    """On the session's shared cluster: what other tests did there is the baseline (the
    router's counters before, the logs' length before)."""
    before = _router_outcomes(shared_cluster["url"])
    logs_from = {p.name: p.log_path.stat().st_size for p in shared_cluster["processes"]}
    seen = asyncio.run(_soak(shared_cluster["url"]))
    print("soak:", dict(seen))
    assert seen["completed"] > 50 and seen["refused"] > 5 and seen["disconnected"] > 2
    _check_nothing_lost(shared_cluster, seen, before, logs_from)


def test_a_snapshot_pool_under_pressure_loses_nothing(tmp_path, e2e):
    """The same traffic with room for three Mamba snapshots per worker: snapshots are
    evicted all the time, and still every answer is whole, nothing stays held, nothing is
    logged as an error or a warning."""
    with e2e.running_cluster(tmp_path, engine={"prefixCache": {
            "snapshotMemoryFraction": "0.001"}}) as fresh:
        seen = asyncio.run(_soak(fresh["url"]))
        print("soak with three snapshots:", dict(seen))
        assert seen["completed"] > 50
        _check_nothing_lost(fresh, seen)
        evicted = sum(v for w in fresh["workers"] for (name, _), v in
                      _metrics(w.metrics_port).items()
                      if name == "baton_prefix_cache_snapshot_evictions_total")
        assert evicted > 20, evicted


def _check_nothing_lost(cluster, seen: Counter, before: Counter | None = None,
                        logs_from: dict[str, int] | None = None) -> None:
    """before: the router's outcome counters before the traffic; logs_from: each process's
    log length before it (a cluster other tests used first)."""
    before = before or Counter()
    logs_from = logs_from or {}
    # Every slot and page is free again on every worker, and nothing runs.
    deadline = time.monotonic() + 60
    while True:
        held = {}
        for w in cluster["workers"]:
            for (name, _labels), value in _metrics(w.metrics_port).items():
                if name in ("baton_kv_cache_usage_ratio", "baton_ssm_state_slots_usage_ratio",
                            "baton_num_requests_running") and value:
                    held[(w.name, name)] = value
        if not held:
            break
        assert time.monotonic() < deadline, f"still held after the traffic ended: {held}"
        time.sleep(0.2)  # a bounded poll for the asserted state

    # The router counted what the clients saw: nothing failed on its side. (A stream's
    # client has [DONE] a moment before the router's handler counts it: poll for it.)
    gone = seen["disconnected"] + seen["gave up"]
    deadline = time.monotonic() + 60
    while True:
        outcomes = _router_outcomes(cluster["url"])
        outcomes.subtract(before)
        ended = outcomes["success"] + outcomes["cancelled"]
        if (outcomes["success"] >= seen["completed"]
                and seen["completed"] + seen["disconnected"] <= ended) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # a bounded poll for the asserted state
    assert outcomes["error"] == 0 and outcomes["timeout"] == 0, outcomes
    assert seen["shed"] == 0, seen  # the queue (64) is deeper than the traffic (16)
    assert seen["refused"] <= outcomes["rejected"] <= (
        seen["refused"] + seen["gave up on a bad request"]), (outcomes, seen)
    assert outcomes["success"] >= seen["completed"], (outcomes, seen)
    assert seen["completed"] + seen["disconnected"] <= ended <= seen["completed"] + gone, \
        (outcomes, seen)

    for p in cluster["processes"]:
        assert p.proc.poll() is None, f"{p.name} exited:\n{p.log()}"
        with p.log_path.open("rb") as f:
            f.seek(logs_from.get(p.name, 0))
            log = f.read().decode(errors="replace")
        bad = [line for line in log.splitlines()
               if " ERROR " in line or " WARNING " in line or line.startswith("Traceback")]
        assert not bad, f"{p.name} logged:\n" + "\n".join(bad[:20])


def test_a_decode_worker_drained_under_traffic_costs_no_client_anything(tmp_path, e2e):
    """SIGTERM on one of the two decode workers in the middle of the same traffic: its streams
    finish, new requests go to the other one, no client sees an error, and it exits 0."""
    with e2e.running_cluster(tmp_path) as cluster:
        _drain_under_traffic(cluster)


def _drain_under_traffic(cluster) -> None:
    import signal
    import threading

    drained = cluster["processes"][1]
    assert drained.name == "decode0"
    timer = threading.Timer(3.0, drained.kill, args=(signal.SIGTERM,))
    timer.start()
    try:
        seen = asyncio.run(_soak(cluster["url"]))
    finally:
        timer.cancel()
    print("soak with a drain:", dict(seen))
    assert seen["completed"] > 50
    assert drained.proc.wait(timeout=60) == 0, drained.log()
    log = drained.log_path.read_text(errors="replace")
    assert "received SIGTERM" in log and "drained; stopping" in log
    outcomes = _router_outcomes(cluster["url"])
    assert outcomes["error"] == 0 and outcomes["timeout"] == 0, outcomes


@pytest.mark.parametrize(("victim_name", "how"), [("decode0", "SIGKILL"),
                                                  ("prefill0", "SIGKILL"),
                                                  ("decode0", "SIGSTOP"),
                                                  ("prefill0", "SIGSTOP")])
def test_a_worker_lost_under_traffic_costs_no_client_anything(victim_name, how, tmp_path, e2e):
    """One of two decode workers or of two prefill workers dies (SIGKILL) or hangs (SIGSTOP:
    alive to TCP, answering nothing, like a stuck GPU) in the middle of the traffic. Streams
    in flight on a lost decode worker continue on the other (one retry each; a hung one is
    left after a few failed health checks), requests whose prefill or transfer it cut are
    prefilled again elsewhere, and no client sees an error."""
    import signal
    import threading

    with e2e.running_cluster(tmp_path, n_prefill=2) as fresh:
        (victim,) = [p for p in fresh["processes"] if p.name == victim_name]
        timer = threading.Timer(3.0, victim.proc.send_signal, args=(getattr(signal, how),))
        timer.start()
        try:
            seen = asyncio.run(_soak(fresh["url"]))
        finally:
            timer.cancel()
            if how == "SIGSTOP":
                victim.proc.send_signal(signal.SIGCONT)
        print(f"soak with {victim_name} lost ({how}):", dict(seen))
        if how == "SIGKILL":
            assert victim.proc.poll() is not None
        assert seen["completed"] > 50
        outcomes = _router_outcomes(fresh["url"])
        assert outcomes["error"] == 0 and outcomes["timeout"] == 0, outcomes
        survivors = [w for w in fresh["workers"] if w is not victim]
        deadline = time.monotonic() + 60
        while any(v for w in survivors for (name, _), v in _metrics(w.metrics_port).items()
                  if name in ("baton_kv_cache_usage_ratio",
                              "baton_ssm_state_slots_usage_ratio")):
            assert time.monotonic() < deadline, "a surviving worker still holds slots"
            time.sleep(0.2)  # a bounded poll for the asserted state
        # Retries are warnings; nothing is an error.
        for p in fresh["processes"]:
            if p is victim:
                continue
            log = p.log_path.read_text(errors="replace")
            bad = [line for line in log.splitlines()
                   if " ERROR " in line or line.startswith("Traceback")]
            assert not bad, f"{p.name} logged:\n" + "\n".join(bad[:20])


def test_overload_is_shed_with_429_and_loses_nothing(tmp_path, e2e):
    """Four times as many clients as the decode workers have slots, and a router queue of 4:
    the excess gets 429 with Retry-After (never a 5xx, never a hang), queued requests whose
    clients give up leave the queue, and afterwards nothing is held or waiting anywhere."""
    with e2e.running_cluster(tmp_path, maxQueuedRequests=4) as fresh:
        seen = asyncio.run(_soak(fresh["url"], concurrency=64,
                                 enough=lambda seen: _enough(seen) and seen["shed"] > 10))
        print("soak under overload:", dict(seen))
        assert seen["shed"] > 10 and seen["completed"] > 50, seen
        deadline = time.monotonic() + 60
        while True:
            held = {(w.name, name): v for w in fresh["workers"]
                    for (name, _), v in _metrics(w.metrics_port).items()
                    if name in ("baton_kv_cache_usage_ratio",
                                "baton_ssm_state_slots_usage_ratio") and v}
            router = {name: v for (name, labels), v in
                      _metrics(int(fresh["url"].rsplit(":", 1)[1])).items()
                      if name in ("baton_num_requests_waiting", "baton_num_requests_running")
                      and v}
            if not held and not router:
                break
            assert time.monotonic() < deadline, f"still held: {held} {router}"
            time.sleep(0.2)  # a bounded poll for the asserted state
        outcomes = _router_outcomes(fresh["url"])
        assert outcomes["error"] == 0 and outcomes["timeout"] == 0, outcomes
        # A client that gave up may have been shed after it left: counted, never seen.
        told = seen["refused"] + seen["shed"]
        assert told <= outcomes["rejected"] <= told + seen["gave up"], (outcomes, seen)
        assert outcomes["success"] >= seen["completed"], (outcomes, seen)
