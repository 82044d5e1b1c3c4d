"""expertParallel: N workers, one replica of N ranks.

In-process: an EngineLoop with a channel on "rank 0" and follow() on a follower thread, joined
by a queue channel, stay in lockstep through requests, prefills (one whose sink fails), reservations
and aborts. Real processes: prefill and decode workers with expertParallel 2 (gloo on the
CPU) give the same greedy completions as 1-rank workers; SIGTERM ends both ranks with equal
token digests; a follower that dies takes its replica down with a clear log line.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

from baton.workers.engine import (
    Engine,
    EngineConfig,
    EngineLoop,
    LayerState,
    Request,
    SamplingParams,
    StateTransferError,
)
from baton.workers.engine.replicated import follow

sys.path.insert(0, str(Path(__file__).parent))
from test_server_workers import TINY, Worker, _prompt, _wait_until, serve

from baton.proto.baton.worker.v1 import worker_pb2


class QueueChannel:
    """Rank 0 -> one follower thread, with the follower's gather answer coming back."""

    def __init__(self) -> None:
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.rank0 = True

    def send(self, message: tuple) -> None:
        self.messages.put(message)

    def recv(self) -> tuple:
        return self.messages.get(timeout=60)

    def gather(self, value):
        if threading.current_thread().name == "follower":
            self.answers.put(value)
            return []
        return [value, self.answers.get(timeout=60)]


class FailingSink:
    def __init__(self, after: int) -> None:
        self.left = after

    def on_layer(self, state: LayerState) -> None:
        self.left -= 1
        if self.left < 0:
            raise ConnectionError("the decode worker went away")


class Capture:
    def __init__(self) -> None:
        self.states: list[LayerState] = []

    def on_layer(self, state: LayerState) -> None:
        self.states.append(state)


def _engine(model, k: int = 0) -> Engine:
    return Engine(model, EngineConfig(page_size=4, num_pages=160, max_num_seqs=6,
                                      max_batch_tokens=64, max_model_len=256, speculative_tokens=k,
                                      base_seed=1234))


@pytest.fixture(scope="module")
def models():
    from baton.workers.model import load_model

    return [load_model(TINY, dtype=torch.float32, kernels="torch") for _ in range(2)]


def test_followers_replay_every_call_in_lockstep(models):
    """Sampled requests, prefills (one with a failing sink), reservations fed from a
    prefill, an abort and a release: the follower's engine ends equal to rank 0's."""
    channel = QueueChannel()
    leader_engine, follower_engine = _engine(models[0], k=1), _engine(models[1], k=1)
    followed: list = []
    follower = threading.Thread(target=lambda: followed.append(
        follow(follower_engine, channel)), name="follower")
    follower.start()
    loop = EngineLoop(leader_engine, idle_wait=0.01, channel=channel)
    try:
        sampling = SamplingParams(max_tokens=5, temperature=0.8, logprobs=0)
        streams = [loop.submit(Request(f"s{i}", _prompt(n, i), sampling))
                   for i, n in enumerate((3, 11, 26))]
        # A prefill whose transfer fails in its first chunk (of three: 64 tokens a step):
        # rank 0 gets the sink's error and the request is gone from both engines.
        broken = loop.run_prefill(Request("broken", _prompt(150, 7), sampling), FailingSink(3))
        # The state of a prompt this replica never saw (another prefill worker's) goes into a
        # reservation (as TransferState would), then commit.
        capture = Capture()
        result = _engine(models[0]).prefill(Request("handed", _prompt(19, 8), sampling), capture)
        with pytest.raises(ConnectionError):
            broken.result(timeout=60)
        reservation = loop.reserve(Request("handed", _prompt(19, 8), sampling))
        assert reservation.cached_tokens == 0 and not reservation.local_prefill
        # The handshake's binding: checked on rank 0, replayed on the follower.
        reservation.bind(reservation.token, reservation.chain_hash)
        for state in capture.states:
            reservation.write(state)
        with pytest.raises(StateTransferError):
            reservation.write(capture.states[0].__class__(
                0, capture.states[0].kind, 0, 99, capture.states[0].tensor))
        handed_stream = loop.commit(reservation, result.first_token, sampling, result.logprob,
                                    result.top_logprobs)
        # A refused reservation counts on no rank: the next one has the same serial on both.
        with pytest.raises(ValueError, match="local_prefill_max_tokens"):
            loop.reserve(Request("refused", _prompt(5, 9), sampling), -1)
        dropped = loop.reserve(Request("dropped", _prompt(5, 9), sampling))
        loop.release(dropped).result(timeout=60)
        # A prompt the replica's prefix cache holds but a few tokens of: prefilled locally, in
        # lockstep (the cache decides the same on every rank).
        extended = Request("local", _prompt(26, 2) + [5, 6, 7], sampling)
        local = loop.reserve(extended, 8)
        assert local.local_prefill and local.cached_tokens >= 26
        streams.append(local.stream)
        aborted = loop.submit(Request("aborted", _prompt(40, 10), sampling))
        aborted.close()
        tokens = {s.request_id: [e.token_id for e in s if e.token_id is not None]
                  for s in streams + [handed_stream]}
        assert all(len(t) == 5 for t in tokens.values()), tokens
        assert loop.drain(timeout=60)
    finally:
        loop.stop()
        agreed = loop.shutdown_followers()
        follower.join(60)
    assert agreed
    assert not follower.is_alive()
    mine, theirs = loop.digest.summary(), followed[0].summary()
    assert mine == theirs and mine[1] >= 5 * 4 + 1
    a, b = leader_engine.stats(), follower_engine.stats()
    assert (a.free_pages, a.free_slots, a.requests_finished_total, a.prompt_tokens_total) == (
        b.free_pages, b.free_slots, b.requests_finished_total, b.prompt_tokens_total)
    assert a.free_slots == 6 and a.free_pages == 160
    assert a.requests_finished_total == {"length": 5, "abort": 2}
    assert a.local_prefills_total == b.local_prefills_total == 1
    assert (a.prefix_hit_tokens_total, a.snapshots) == (b.prefix_hit_tokens_total, b.snapshots)


def test_a_call_inside_a_step_is_refused_or_deferred(models):
    """A callback inside a step cannot reach the followers mid-step: aborts wait for the
    step's end, calls that wait for the engine raise."""
    channel = QueueChannel()
    loop = EngineLoop(_engine(models[0]), idle_wait=0.01, channel=channel)
    seen: list = []
    refused: list = []

    class Reentrant:
        def on_layer(self, state: LayerState) -> None:
            if not seen:
                seen.append(loop.abort("victim"))
                try:
                    loop.submit(Request("late", [5, 6], SamplingParams()))
                except RuntimeError as e:
                    refused.append(str(e))

    try:
        victim = loop.submit(Request("victim", _prompt(8, 1), SamplingParams(max_tokens=50)))
        done = loop.run_prefill(Request("p", _prompt(8, 2), SamplingParams()), Reentrant())
        done.result(timeout=60)
        assert [e.finish_reason for e in victim][-1] == "abort"
    finally:
        loop.stop()
    sent = []
    while True:
        try:
            sent.append(channel.messages.get_nowait()[0])
        except queue.Empty:
            break
    assert seen == [None] and "inside an engine step" in refused[0]
    # The abort reached the followers once the step it was asked for in had ended; the
    # refused call never reached them.
    assert sent.index("abort") > sent.index("add_prefill") and sent.count("add_request") == 1


def test_more_ranks_than_gpus_is_a_clear_error():
    from baton.workers.server.replica import check_devices

    check_devices("decode", 2, torch.device("cpu"))  # gloo ranks: any number
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match=r"decode.expertParallel=64 needs 64 GPUs"):
            check_devices("decode", 64, torch.device("cuda"))


IDLE_SCRIPT = """
import pathlib, sys, time
import torch
from baton.workers.server import replica

replica.RENDEZVOUS_TIMEOUT_SECONDS = 2.0  # the experts' group: a short timeout
rank, init, barrier = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
# Both processes meet here first, so start-up skew does not eat the short timeout.
(barrier / str(rank)).touch()
while len(list(barrier.glob("[01]"))) < 2:
    time.sleep(0.01)  # a bounded poll: the test's join bounds it
ranks = replica.Ranks(rank, 2, init, torch.device("cpu"))
if rank == 0:
    # What is tested is time itself: a replica idle for longer than the group's timeout (no
    # clock to inject into gloo). Load can only lengthen the idle time, which is the point.
    time.sleep(4.0)
    ranks.channel.send(("step",))
else:
    print("received", ranks.channel.recv())
ranks.channel.gather(rank)  # as at shutdown: the last message before the ranks close
if rank == 0:
    while not (barrier / "closed").exists():  # as in a worker: followers go first
        time.sleep(0.01)  # a bounded poll: the test's join bounds it
ranks.close()
if rank == 1:
    (barrier / "closed").touch()
"""


def test_followers_wait_out_an_idle_replica(tmp_path):
    """Followers block on rank 0's next call with no timeout of their own."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "idle.py"
    script.write_text(IDLE_SCRIPT)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), init, str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "received ('step',)" in outputs[1]


# ---- real worker processes -------------------------------------------------------------

MAX_TOKENS = 5


def _config(tmp: Path, name: str, ranks: int) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({
        "model": "tiny", "namespace": "test", "modelPath": str(TINY),
        "engine": {"maxModelLen": 256, "kvPageSize": 16, "dtype": "float32"},
        "prefill": {"maxBatchTokens": 512, "expertParallel": ranks},
        "decode": {"maxConcurrency": 8, "speculativeTokens": 1, "expertParallel": ranks},
        "router": {"requestTimeoutSeconds": 120, "transferTimeoutSeconds": 30},
        "pools": {"prefill": [{"name": "local"}], "decode": [{"name": "local"}]}}))
    return path


def _complete(prefill: Worker, decode: Worker, prompt: list[int]):
    sampling = worker_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                         logprobs=True, ignore_eos=True)
    out = serve(prefill, decode, prompt, sampling)
    return out.tokens, out.logprobs


def _concurrently(prefill: Worker, decode: Worker, prompts: list[list[int]]):
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = _complete(prefill, decode, prompts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None for r in results), results
    return results


def _followers(worker: Worker) -> list[int]:
    path = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children")
    return [int(p) for p in path.read_text().split()]


def test_two_rank_workers_complete_like_one_rank_workers(tmp_path, models):
    lengths = [1, 7, 23, 61, 130]
    prompts = [_prompt(n, 40 + n) for n in lengths]
    workers = {}
    try:
        for ranks in (2, 1):
            config = _config(tmp_path, f"ep{ranks}", ranks)
            # gloo ranks on the CPU, whatever the machine has.
            workers[ranks] = (Worker("prefill", config, tmp_path, ("--device", "cpu")),
                              Worker("decode", config, tmp_path, ("--device", "cpu")))
        for pair in workers.values():
            for worker in pair:
                worker.wait_serving(180)
        assert [len(_followers(w)) for w in workers[2]] == [1, 1]
        for worker in workers[2]:
            assert "2 expert-parallel rank(s)" in worker.log()
            # Rank 1 logs once its own engine is built, which may end after rank 0 serves.
            _wait_until(lambda w=worker: "expert-parallel rank 1 of 2 loaded" in w.log(), 60)
        two = _concurrently(*workers[2], prompts)
        one = _concurrently(*workers[1], prompts)
        # Batches form by timing, so a near-tie (reference top-1/top-2 margin <= 1e-3) may
        # part the two runs; before the first one they agree (DESIGN.md, Seams: tests).
        checked = 0
        for n, prompt, (tokens2, lp2), (tokens1, lp1) in zip(lengths, prompts, two, one):
            assert len(tokens1) == len(tokens2) == MAX_TOKENS
            with torch.no_grad():
                logits = models[0](torch.tensor([prompt + tokens1]))[0].float()
            for step in range(MAX_TOKENS):
                top2 = torch.topk(logits[len(prompt) - 1 + step], 2).values
                if top2[0] - top2[1] <= 1e-3:
                    break
                assert tokens2[step] == tokens1[step], (n, step)
                assert abs(lp2[step] - lp1[step]) <= 1e-4, (n, step, lp2, lp1)
                checked += 1
            else:
                assert tokens2 == tokens1
        assert checked >= MAX_TOKENS * (len(prompts) - 1)  # ties are rare: most steps count

        # SIGTERM: rank 0 drains, tells its follower to exit and compares their digests.
        prefill2, decode2 = workers[2]
        decode_followers = _followers(decode2)
        decode2.proc.send_signal(signal.SIGTERM)
        assert decode2.proc.wait(60) == 0, decode2.log()
        agreed = re.search(r"expert-parallel ranks agree: 2 ranks, (\d+) steps, (\d+) tokens",
                           decode2.log())
        assert agreed, decode2.log()
        # Every token of every request went through both ranks' digests.
        assert int(agreed[2]) == len(prompts) * MAX_TOKENS and int(agreed[1]) >= MAX_TOKENS
        assert not any(Path(f"/proc/{pid}").exists() and _alive(pid)
                       for pid in decode_followers)

        # A follower that dies takes its replica down, with the rank named.
        os.kill(_followers(prefill2)[0], signal.SIGKILL)
        assert prefill2.proc.wait(30) == 3, prefill2.log()
        assert "expert-parallel rank 1" in prefill2.log()
        assert "exited with status -9" in prefill2.log()
    finally:
        for pair in workers.values():
            for worker in pair:
                for pid in _followers(worker) if worker.proc.poll() is None else []:
                    os.kill(pid, signal.SIGKILL)
                worker.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
