"""Real `baton worker prefill|decode` processes with the tiny model, over real gRPC.

One prefill and one decode worker are shared by the module (start-up dominates the cost);
the drain test that stops them runs last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from baton.proto.baton.decode.v1 import decode_pb2, decode_pb2_grpc
from baton.proto.baton.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from baton.proto.baton.worker.v1 import worker_pb2, worker_pb2_grpc
from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from baton.workers.engine import prompt_chain_hash

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny"
SPEC_TOKENS = 1
MAX_MODEL_LEN = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A worker process and its ports; stderr goes to a file the tests read."""

    def __init__(self, role: str, config: Path, log_dir: Path, extra: tuple[str, ...] = ()):
        self.role = role
        self.grpc_port = _free_port()
        self.metrics_port = _free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_dir / f"{role}-{self.grpc_port}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "baton.workers.cli", "worker", role, "--config", str(config),
             "--pool", "local", "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
             "--metrics-port", str(self.metrics_port), "--log-level", "DEBUG",
             "--drain-seconds", "20", "--cache-memory", "64Mi",
             *(() if "--certs" in extra else ("--plaintext",)), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.channel = grpc.insecure_channel(self.address)
        self.ready_seconds: float | None = None

    def wait_serving(self, timeout: float = 120.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        end = time.monotonic() + timeout
        seen_not_serving = False
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                time.sleep(0.1)  # a bounded poll for the asserted state (SERVING)
                continue
            if status == health_pb2.HealthCheckResponse.SERVING:
                self.ready_seconds = time.monotonic() - self.started
                self.seen_not_serving = seen_not_serving
                return
            seen_not_serving = True
            time.sleep(0.1)  # a bounded poll for the asserted state (SERVING)
        raise AssertionError(f"{self.role} not SERVING after {timeout} s:\n{self.log()}")

    def load(self) -> worker_pb2.LoadResponse:
        return worker_pb2_grpc.WorkerServiceStub(self.channel).Load(worker_pb2.LoadRequest(),
                                                                      timeout=5)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def metric(self, name: str, **labels: str) -> float:
        pattern = re.compile(rf"^{name}{{([^}}]*)}} (\S+)$", re.MULTILINE)
        for match in pattern.finditer(self.metrics()):
            got = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(match[2])
        raise AssertionError(f"{name}{labels} not exported")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.channel.close()
        self._log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    config = tmp / "worker.json"
    config.write_text(json.dumps({
        "model": "tiny", "namespace": "test", "modelPath": str(TINY),
        "engine": {"maxModelLen": MAX_MODEL_LEN, "kvPageSize": 16, "dtype": "auto"},
        "prefill": {"maxBatchTokens": 2048},
        "decode": {"maxConcurrency": 16, "speculativeTokens": SPEC_TOKENS},
        "router": {"requestTimeoutSeconds": 120, "transferTimeoutSeconds": 20},
        "pools": {"prefill": [{"name": "local"}], "decode": [{"name": "local"}]}}))
    decode = Worker("decode", config, tmp)
    prefill = Worker("prefill", config, tmp)
    try:
        decode.wait_serving()
        prefill.wait_serving()
        yield {"decode": decode, "prefill": prefill, "config": config, "tmp": tmp}
    finally:
        prefill.stop()
        decode.stop()


def _sampling(max_tokens: int, **extra) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True,
                                     **extra)


def _reserve(decode: Worker, prompt: list[int], sampling, request_id: str | None = None,
             local_max: int = 0, num_output_tokens: int = 0, cache_salt: bytes = b""):
    request_id = request_id or uuid.uuid4().hex
    reserved = decode_pb2_grpc.DecodeServiceStub(decode.channel).Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt,
                                  sampling=sampling, local_prefill_max_tokens=local_max,
                                  num_output_tokens=num_output_tokens, cache_salt=cache_salt),
        timeout=30)
    return request_id, reserved


def _generate(decode: Worker, request_id: str, reserved, timeout: float = 120):
    return decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(
        decode_pb2.GenerateRequest(request_id=request_id,
                                   reservation_id=reserved.reservation_id), timeout=timeout)


def _prefill_request(decode: Worker, request_id: str, prompt: list[int], sampling, reserved,
                     num_output_tokens: int = 0, cache_salt: bytes = b""):
    return prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
        decode_target=decode.address, reservation_id=reserved.reservation_id,
        reservation_token=reserved.reservation_token,
        prompt_chain_hash=reserved.prompt_chain_hash,
        decode_cached_tokens=reserved.cached_tokens, num_output_tokens=num_output_tokens,
        cache_salt=cache_salt)


def _binding(reserved):
    """What a Prefill presents: the Reserve answer's token and the prompt's chain hash."""
    from baton.workers.transfer import ReservationBinding

    return ReservationBinding(reserved.reservation_token, reserved.prompt_chain_hash)


def serve(prefill: Worker, decode: Worker, prompt: list[int], sampling,
          request_id: str | None = None, local_max: int = 0,
          num_output_tokens: int = 0, cache_salt: bytes = b"") -> SimpleNamespace:
    """Router-like: Reserve on decode, then Generate beside the Prefill (unless the decode
    worker prefills locally)."""
    request_id, reserved = _reserve(decode, prompt, sampling, request_id, local_max,
                                    num_output_tokens, cache_salt)
    stream = _generate(decode, request_id, reserved)
    answer = None
    if not reserved.local_prefill:
        answer = prefill_pb2_grpc.PrefillServiceStub(prefill.channel).Prefill(
            _prefill_request(decode, request_id, prompt, sampling, reserved,
                             num_output_tokens, cache_salt), timeout=120)
    tokens, logprobs, finish, cached = [], [], None, None
    for message in stream:
        if cached is None:
            cached = message.num_cached_tokens
        for token in message.tokens:
            tokens.append(token.token_id)
            logprobs.append(token.logprob)
        if message.finish_reason:
            finish = message.finish_reason
    return SimpleNamespace(answer=answer, tokens=tokens, logprobs=logprobs, finish=finish,
                           reserved=reserved, cached=cached, request_id=request_id)


def _run(cluster, prompt: list[int], max_tokens: int, request_id: str | None = None,
         sampling: worker_pb2.SamplingParams | None = None, num_output_tokens: int = 0):
    out = serve(cluster["prefill"], cluster["decode"], prompt,
                sampling or _sampling(max_tokens), request_id,
                num_output_tokens=num_output_tokens)
    return out.answer, out.tokens, out.logprobs, out.finish


@pytest.fixture(scope="module")
def reference_model():
    from baton.workers.model import load_model

    return load_model(TINY, dtype=torch.float32, device="cpu", kernels="torch")


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def test_health_and_load_while_serving(cluster):
    for worker in (cluster["decode"], cluster["prefill"]):
        assert worker.ready_seconds is not None and worker.ready_seconds < 120
        load = worker.load()
        assert not load.draining
        assert load.role == (worker_pb2.ROLE_DECODE if worker.role == "decode"
                             else worker_pb2.ROLE_PREFILL)
        assert worker.metric("baton_kv_cache_usage_ratio", namespace="test", model="tiny",
                             role=worker.role, pool="local") == 0.0
    assert cluster["decode"].load().free_slots == 16


def test_disaggregated_equals_full_recompute(cluster, reference_model):
    """Eight concurrent requests (one spanning many KV pages) through prefill -> decode:
    greedy tokens equal where the reference margin is clear, logprobs within 1e-4."""
    lengths = [1, 5, 17, 33, 64, 150, 301, 9]
    prompts = [_prompt(n, seed) for seed, n in enumerate(lengths)]
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = _run(cluster, prompts[i], max_tokens=6)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for prompt, (answer, tokens, logprobs, finish) in zip(prompts, results):
        assert answer.num_prompt_tokens == len(prompt)
        assert tokens[0] == answer.first_token.token_id
        if finish == decode_pb2.FINISH_REASON_STOP:
            assert tokens[-1] in _eos_ids() and len(tokens) <= 6
        else:
            assert len(tokens) == 6 and finish == decode_pb2.FINISH_REASON_LENGTH
        # Teacher-forced reference: a full forward over prompt + generated tokens.
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(reference_model(ids)[0].float(), dim=-1)
        for step, (token, lp) in enumerate(zip(tokens, logprobs)):
            row = logp[len(prompt) - 1 + step]
            top2 = torch.topk(row, 2).values
            if top2[0] - top2[1] > 1e-3:
                assert token == int(row.argmax()), (len(prompt), step)
            assert abs(lp - float(row[token])) <= 1e-4, (len(prompt), step, lp)
    # The same requests in one single-process engine (speculation on, as on the decode
    # worker): the same tokens up to the first step where the reference margin is a tie.
    from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams

    engine = Engine(reference_model, EngineConfig(num_pages=512, max_num_seqs=8,
                                                  speculative_tokens=SPEC_TOKENS,
                                                  eos_token_ids=_eos_ids()))
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(f"ref{i}", prompt, SamplingParams(
            max_tokens=6, temperature=0.0, logprobs=0)))
    single: dict[str, list[int]] = {f"ref{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                single[event.request_id].append(event.token_id)
    for i, (prompt, (_, tokens, _, _)) in enumerate(zip(prompts, results)):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = reference_model(ids)[0].float()
        for step, token in enumerate(tokens):
            top2 = torch.topk(logits[len(prompt) - 1 + step], 2).values
            if top2[0] - top2[1] <= 1e-3:
                break  # a near-tie: the two runs may part here
            assert single[f"ref{i}"][step] == token, (len(prompt), step)
        else:
            assert single[f"ref{i}"] == tokens

    decode = cluster["decode"]
    assert decode.metric("baton_requests_total", role="decode", outcome="success") >= 8
    for kind in ("kv", "conv", "ssm", "mtp_kv", "hidden"):
        assert cluster["prefill"].metric("baton_state_transfer_bytes_total", role="prefill",
                                         kind=kind) > 0
    assert decode.metric("baton_state_transfer_bytes_total", role="decode", kind="kv") == 0
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)


def _eos_ids() -> list[int]:
    from baton.workers.text.tokenizer import load_tokenizer

    return list(load_tokenizer(TINY).eos_token_ids)


def _wait_until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)  # a bounded poll for the asserted state


_EVENT = re.compile(r"state (handed|arrived) request=(\S+) index=(\d+) layer=(\d+) "
                    r"kind=(\w+).* at=([\d.]+)")


def _events(log: str, kind: str, request_id: str) -> list[tuple[int, int, str, float]]:
    return [(int(m[3]), int(m[4]), m[5], float(m[6])) for m in _EVENT.finditer(log)
            if m[1] == kind and m[2] == request_id]


def test_layer_states_stream_while_prefill_runs(cluster):
    """The decode worker holds early layers' state before the prefill handed the last one."""
    request_id = "stream-" + uuid.uuid4().hex
    _run(cluster, _prompt(MAX_MODEL_LEN - 8, 99), max_tokens=2, request_id=request_id)
    handed = _events(cluster["prefill"].log(), "handed", request_id)
    arrived = _events(cluster["decode"].log(), "arrived", request_id)
    assert len(handed) == len(arrived) >= 6
    assert [h[:3] for h in handed] == [a[:3] for a in arrived]
    last_handed = max(h[3] for h in handed)
    first_arrived = min(a[3] for a in arrived)
    assert first_arrived < last_handed, (first_arrived, last_handed)
    # Every state arrives after it was handed over (the clocks are one machine's).
    assert all(a[3] >= h[3] for h, a in zip(handed, arrived))


_STALLED_SENDER = textwrap.dedent("""
    import sys, time, torch
    from baton.workers.engine import LayerState, StateKind
    from baton.workers.transfer import GrpcTransport, ReservationBinding
    address, reservation_id, request_id, fingerprint = sys.argv[1:5]
    n, start = int(sys.argv[5]), int(sys.argv[6])
    binding = ReservationBinding(sys.argv[7], bytes.fromhex(sys.argv[8]))
    sender = GrpcTransport(fingerprint).open(address, reservation_id, request_id, n, start,
                                             time.time() + 60, binding)
    sender.on_layer(LayerState(1, StateKind.KV, start, n, torch.zeros(2, n - start, 2, 16)))
    print("sent", flush=True)
    time.sleep(60)  # a stalled sender: it holds its stream open until the test kills it
""")


def test_killed_sender_mid_transfer_releases_everything(cluster):
    decode = cluster["decode"]
    prompt = _prompt(200, 5)
    request_id, reserved = _reserve(decode, prompt, _sampling(4), "killed-" + uuid.uuid4().hex)
    stream = _generate(decode, request_id, reserved, timeout=60)
    assert decode.load().ssm_state_slots_usage_ratio > 0
    fingerprint = cluster["decode"].load().fingerprint
    sender = subprocess.Popen([sys.executable, "-c", _STALLED_SENDER, decode.address,
                               reserved.reservation_id, request_id, fingerprint,
                               str(len(prompt)), str(reserved.cached_tokens),
                               reserved.reservation_token, reserved.prompt_chain_hash.hex()],
                              stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert sender.stdout.readline().strip() == b"sent"
        _wait_until(lambda: re.search(f"state arrived request={request_id}", decode.log()))
        assert decode.load().kv_cache_usage_ratio > 0
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
    finally:
        if sender.poll() is None:
            sender.kill()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
    assert decode.load().ssm_state_slots_usage_ratio == 0.0
    assert decode.metric("baton_kv_cache_usage_ratio", role="decode") == 0.0
    assert decode.metric("baton_ssm_state_slots_usage_ratio", role="decode") == 0.0


def test_killed_prefill_worker_mid_transfer_releases_everything(cluster):
    """A real prefill worker, killed while it streams a long prompt chunk by chunk."""
    decode = cluster["decode"]
    config = json.loads(cluster["config"].read_text())
    config["prefill"]["maxBatchTokens"] = 32  # the prompt takes many steps: a long transfer
    slow_config = cluster["tmp"] / "slow-prefill.json"
    slow_config.write_text(json.dumps(config))
    prefill = Worker("prefill", slow_config, cluster["tmp"])
    try:
        prefill.wait_serving()
        prompt = _prompt(MAX_MODEL_LEN - 8, 13)
        request_id, reserved = _reserve(decode, prompt, _sampling(4),
                                        "victim-" + uuid.uuid4().hex)
        stream = _generate(decode, request_id, reserved)
        answer = prefill_pb2_grpc.PrefillServiceStub(prefill.channel).Prefill.future(
            _prefill_request(decode, request_id, prompt, _sampling(4), reserved), timeout=120)
        _wait_until(lambda: re.search(f"state arrived request={request_id}", decode.log()))
        prefill.proc.send_signal(signal.SIGKILL)
        prefill.proc.wait(10)
        arrived = len(re.findall(f"state arrived request={request_id}", decode.log()))
        with pytest.raises(grpc.RpcError):
            answer.result()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        # Mid-transfer: some layer states had arrived, and the stream failed instead of
        # decoding (a complete transfer would have let D decode without P).
        assert arrived >= 1
        _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
        assert decode.load().ssm_state_slots_usage_ratio == 0.0
        assert decode.metric("baton_kv_cache_usage_ratio", role="decode") == 0.0
        assert decode.metric("baton_ssm_state_slots_usage_ratio", role="decode") == 0.0
    finally:
        prefill.stop()


def _send_kv(sender, n: int):
    """Sends one layer's KV of n tokens and the first token; the TransferError it ends with."""
    from baton.workers.engine import LayerState, StateKind
    from baton.workers.transfer import FirstToken, TransferError

    with pytest.raises(TransferError) as err:
        sender.on_layer(LayerState(1, StateKind.KV, 0, n, torch.randn(2, n, 2, 16)))
        sender.finish(FirstToken(5))
    return err.value


def test_corrupted_chunk_is_detected_by_the_decode_worker(cluster):
    from baton.workers.transfer import FailureReason, GrpcTransport

    class Corrupting(GrpcTransport):
        def tamper(self, chunk, message):
            corrupted = bytearray(message)
            corrupted[-1] ^= 1
            return bytes(corrupted)

    decode = cluster["decode"]
    prompt = _prompt(40, 6)
    request_id, reserved = _reserve(decode, prompt, _sampling(4),
                                    "corrupt-" + uuid.uuid4().hex)
    stream = _generate(decode, request_id, reserved, timeout=60)
    sender = Corrupting(cluster["decode"].load().fingerprint).open(
        decode.address, reserved.reservation_id, request_id, len(prompt), 0, time.time() + 30,
        _binding(reserved))
    assert _send_kv(sender, len(prompt)).reason is FailureReason.DATA_LOSS
    with pytest.raises(grpc.RpcError) as gen_err:
        list(stream)
    assert gen_err.value.code() == grpc.StatusCode.DATA_LOSS
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
    assert decode.load().ssm_state_slots_usage_ratio == 0.0
    assert decode.metric("baton_state_transfer_failures_total", role="decode") >= 1


def test_fingerprint_mismatch_refused_by_the_decode_worker(cluster):
    from baton.workers.transfer import FailureReason, FirstToken, GrpcTransport, TransferError

    decode = cluster["decode"]
    prompt = _prompt(10, 7)
    request_id, reserved = _reserve(decode, prompt, _sampling(4),
                                    "stranger-" + uuid.uuid4().hex)
    stream = _generate(decode, request_id, reserved, timeout=60)
    sender = GrpcTransport("0" * 64).open(decode.address, reserved.reservation_id, request_id,
                                          len(prompt), 0, time.time() + 30, _binding(reserved))
    with pytest.raises(TransferError) as err:
        sender.finish(FirstToken(5))
    assert err.value.reason is FailureReason.REFUSED
    with pytest.raises(grpc.RpcError) as gen_err:
        list(stream)
    assert gen_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _wait_until(lambda: decode.load().ssm_state_slots_usage_ratio == 0.0)


def test_cancelled_generate_frees_its_room(cluster):
    """The router cancels D's Generate (client gone, prefill failed): before the state came
    and in the middle of the token stream. Either way every slot and page is free again."""
    decode = cluster["decode"]
    request_id, reserved = _reserve(decode, _prompt(100, 11), _sampling(4), "cancel-early")
    waiting = _generate(decode, request_id, reserved, timeout=60)
    assert decode.load().kv_cache_usage_ratio > 0
    waiting.cancel()
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
    assert decode.load().ssm_state_slots_usage_ratio == 0.0

    prompt = _prompt(50, 12)
    sampling = _sampling(300, ignore_eos=True)
    request_id, reserved = _reserve(decode, prompt, sampling, "cancel-mid-" + uuid.uuid4().hex)
    stream = _generate(decode, request_id, reserved, timeout=60)
    prefill_pb2_grpc.PrefillServiceStub(cluster["prefill"].channel).Prefill(
        _prefill_request(decode, request_id, prompt, sampling, reserved), timeout=60)
    got = 0
    for message in stream:
        got += len(message.tokens)
        if got >= 3:
            break
    assert decode.load().running == 1
    stream.cancel()
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
    assert decode.load().ssm_state_slots_usage_ratio == 0.0 and decode.load().running == 0
    assert decode.metric("baton_requests_total", role="decode", outcome="cancelled") >= 2


def test_bad_requests_get_clear_statuses(cluster):
    decode = decode_pb2_grpc.DecodeServiceStub(cluster["decode"].channel)
    prefill = prefill_pb2_grpc.PrefillServiceStub(cluster["prefill"].channel)
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(decode_pb2.ReserveRequest(request_id="e1", prompt_token_ids=[],
                                                 sampling=_sampling(4)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(decode_pb2.ReserveRequest(
            request_id="e2", prompt_token_ids=[1] * MAX_MODEL_LEN, sampling=_sampling(4)),
            timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Generate streams a reservation: none named, or none held under that name.
    for rid, code in (("", grpc.StatusCode.INVALID_ARGUMENT),
                      ("nobody", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as err:
            list(decode.Generate(decode_pb2.GenerateRequest(request_id="e", reservation_id=rid),
                                 timeout=10))
        assert err.value.code() == code
    assert not decode.Release(decode_pb2.ReleaseRequest(reservation_id="nobody"),
                              timeout=10).released

    ours = prompt_chain_hash([1, 2])

    def prefill_call(request_id, sampling=None, target=None, reservation="some", cached=0,
                     token="t" * 32, chain_hash=ours):
        return prefill.Prefill(prefill_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=[1, 2], sampling=sampling or _sampling(4),
            decode_target=target or cluster["decode"].address, reservation_id=reservation,
            decode_cached_tokens=cached, reservation_token=token,
            prompt_chain_hash=chain_hash), timeout=20)

    for call, code, needle in (
            (lambda: prefill_call("e3", sampling=_sampling(4, top_p=2.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            (lambda: prefill_call("e4", target="nowhere"),
             grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
            (lambda: prefill_call("e4r", reservation=""),
             grpc.StatusCode.INVALID_ARGUMENT, "reservation_id is required"),
            (lambda: prefill_call("e4c", cached=2),
             grpc.StatusCode.INVALID_ARGUMENT, "decode_cached_tokens=2"),
            (lambda: prefill_call("e4t", token=""),
             grpc.StatusCode.INVALID_ARGUMENT, "reservation_token is required"),
            (lambda: prefill_call("e4h", chain_hash=prompt_chain_hash([1, 3])),
             grpc.StatusCode.FAILED_PRECONDITION, "another prompt"),
            # A decode worker that is not there: the router retries elsewhere.
            (lambda: prefill_call("e4b", target=f"127.0.0.1:{_free_port()}"),
             grpc.StatusCode.UNAVAILABLE, ""),
            # The decode worker holds no such reservation.
            # (the decode worker's status only: a remote's answer text is never relayed)
            (lambda: prefill_call("e5", reservation="nobody"),
             grpc.StatusCode.NOT_FOUND, "NOT_FOUND")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and needle in err.value.details()
    # Failed prefills hold nothing afterwards.
    prefill_worker = cluster["prefill"]
    _wait_until(lambda: prefill_worker.load().ssm_state_slots_usage_ratio == 0.0)
    assert prefill_worker.load().kv_cache_usage_ratio == 0.0
    assert prefill_worker.metric("baton_requests_total", role="prefill", outcome="error") >= 2


def test_a_constrained_request_over_grpc(cluster):
    """A JSON Schema grammar through Prefill + Generate: the prefill worker samples the first
    token under it, the decode worker rebuilds the matcher from it and continues (with
    speculation); a retry's num_output_tokens resumes the grammar on both workers; a grammar
    that cannot compile is INVALID_ARGUMENT on both, naming the problem."""
    import jsonschema
    from llguidance import LLMatcher

    from baton.workers.text.tokenizer import load_tokenizer

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["a", "b"]},
        "list": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                 "maxItems": 3}},
        "required": ["name", "n", "kind", "list"], "additionalProperties": False}
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    tokenizer = load_tokenizer(TINY)
    prompt = tokenizer.encode("Describe something:")

    def sampling(seed: int, max_tokens: int = 100) -> worker_pb2.SamplingParams:
        return worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                                         grammar=grammar, frequency_penalty=0.5)

    for seed in range(3):
        # A prompt of its own per seed: the decode worker holds none of it, so the prefill
        # worker runs it and samples the first token.
        seeded = prompt + tokenizer.encode(f" {seed}")
        answer, tokens, _, finish = _run(cluster, seeded, 0, sampling=sampling(seed))
        assert finish == decode_pb2.FINISH_REASON_STOP
        assert tokens[0] == answer.first_token.token_id
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
        m = len(tokens) // 2
        _, rest, _, finish = _run(cluster, seeded + tokens[:m], 0,
                                  sampling=sampling(seed, 100 - m), num_output_tokens=m)
        assert (rest, finish) == (tokens[m:], decode_pb2.FINISH_REASON_STOP)
    # The same prompt again: a whole-prompt hit on the decode worker (its snapshot at the
    # prompt's end), whose first token is sampled without a forward, under the grammar too.
    again = serve(cluster["prefill"], cluster["decode"], seeded, sampling(7))
    assert again.answer is None and again.cached == len(seeded)
    assert again.finish == decode_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads(tokenizer.decode(again.tokens)), schema)

    bad = worker_pb2.SamplingParams(max_tokens=4, grammar=json.dumps(
        {"grammars": [{"lark_grammar": "start: foo"}]}))
    decode = decode_pb2_grpc.DecodeServiceStub(cluster["decode"].channel)
    prefill = prefill_pb2_grpc.PrefillServiceStub(cluster["prefill"].channel)
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(decode_pb2.ReserveRequest(
            request_id="g1", prompt_token_ids=prompt, sampling=bad), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SamplingParams.grammar is invalid" in err.value.details()
    assert "foo" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(prefill_pb2.PrefillRequest(
            request_id="g2", prompt_token_ids=prompt, sampling=bad,
            decode_target=cluster["decode"].address, reservation_id="r-g2",
            reservation_token="t" * 32, prompt_chain_hash=prompt_chain_hash(prompt)),
            timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SamplingParams.grammar is invalid" in err.value.details()
    _wait_until(lambda: cluster["decode"].load().kv_cache_usage_ratio == 0.0)
def test_turns_of_a_session_hit_both_caches_and_prefill_locally(cluster, reference_model):
    """Turn 2 of a chat: the decode worker holds turn 1 but its last token, the prefill
    worker turn 1's prompt; only the KV after the decode worker's hit travels. Turn 3 adds a
    few tokens: the decode worker prefills them itself. Every token matches the reference."""
    prefill, decode = cluster["prefill"], cluster["decode"]
    sampling = _sampling(6, ignore_eos=True)
    turn1 = _prompt(90, 31)
    first = serve(prefill, decode, turn1, sampling)
    cold_bytes = first.answer.transferred_bytes
    assert first.cached == 0 and first.reserved.cached_tokens == 0
    turn2 = turn1 + first.tokens + _prompt(70, 32)
    second = serve(prefill, decode, turn2, sampling)
    assert second.reserved.cached_tokens >= len(turn1) + len(first.tokens) - 1
    assert not second.reserved.local_prefill
    assert second.answer.cached_tokens == len(turn1)  # P's snapshot of turn 1's prompt
    assert second.cached == second.answer.cached_tokens  # what the client is told
    # Only the 70-odd tokens D lacked moved (turn 2 is twice as long as turn 1).
    assert second.answer.transferred_bytes < cold_bytes
    turn3 = turn2 + second.tokens + [7, 8, 9]
    prefills = prefill.metric("baton_requests_total", role="prefill", outcome="success")
    third = serve(prefill, decode, turn3, sampling, local_max=16)
    assert third.reserved.local_prefill and third.answer is None
    assert third.cached == third.reserved.cached_tokens >= len(turn2) + 5
    assert prefill.metric("baton_requests_total", role="prefill", outcome="success") == prefills
    for prompt, out in ((turn1, first), (turn2, second), (turn3, third)):
        ids = torch.tensor([prompt + out.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(reference_model(ids)[0].float(), dim=-1)
        for step, (token, lp) in enumerate(zip(out.tokens, out.logprobs)):
            row = logp[len(prompt) - 1 + step]
            top2 = torch.topk(row, 2).values
            if top2[0] - top2[1] > 1e-3:
                assert token == int(row.argmax()), (len(prompt), step)
            assert abs(lp - float(row[token])) <= 1e-4, (len(prompt), step, lp)
    assert decode.metric("baton_local_prefills_total", role="decode") >= 1
    assert decode.metric("baton_prefix_cache_hit_tokens_total", role="decode") >= len(turn2)
    assert prefill.metric("baton_prefix_cache_hit_tokens_total", role="prefill") >= len(turn1)
    assert decode.metric("baton_state_transfer_saved_bytes_total", role="decode",
                         kind="ssm") > 0
    assert decode.metric("baton_state_transfer_saved_bytes_total", role="decode",
                         kind="kv") > 0
    assert 0 < decode.metric("baton_prefix_cache_snapshot_usage_ratio", role="decode") <= 1
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)


def test_cache_salts_keep_the_prefix_caches_apart(cluster):
    """A prompt cached under one salt (one API key's) is no hit under another or under none,
    on either worker; under its own salt it hits. A salt over 64 bytes is refused."""
    prefill, decode = cluster["prefill"], cluster["decode"]
    sampling = _sampling(3, ignore_eos=True)
    prompt = _prompt(77, 29)
    salt_a, salt_b = b"a" * 32, b"b" * 32
    first = serve(prefill, decode, prompt, sampling, cache_salt=salt_a)
    assert first.reserved.cached_tokens == 0 and first.answer.cached_tokens == 0
    for salt in (salt_b, b""):
        other = serve(prefill, decode, prompt, sampling, cache_salt=salt)
        assert other.reserved.cached_tokens == 0 and other.cached == 0
        assert other.answer.cached_tokens == 0  # nor on the prefill worker
        assert other.tokens == first.tokens
    again = serve(prefill, decode, prompt + first.tokens + [5, 6], sampling,
                  cache_salt=salt_a)
    assert again.cached >= len(prompt)
    with pytest.raises(grpc.RpcError) as info:
        _reserve(decode, prompt, sampling, cache_salt=b"x" * 65)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in info.value.details()
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)


def test_released_reservations_free_their_room(cluster):
    decode = cluster["decode"]
    stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
    _, reserved = _reserve(decode, _prompt(60, 41), _sampling(4))
    assert decode.load().ssm_state_slots_usage_ratio > 0
    release = decode_pb2.ReleaseRequest(reservation_id=reserved.reservation_id)
    assert stub.Release(release, timeout=10).released
    assert not stub.Release(release, timeout=10).released
    _wait_until(lambda: decode.load().ssm_state_slots_usage_ratio == 0.0)
    assert decode.load().kv_cache_usage_ratio == 0.0


def _make_pki(folder: Path) -> Path:
    """A CA, a decode certificate for decode.baton.test and a prefill client certificate."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=baton-test-ca")
    for name in ("decode", "prefill"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}.baton.test\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_transfers_over_mutual_tls(cluster, reference_model):
    """With transfer TLS, state travels only over the decode worker's TLS listener."""
    tmp = cluster["tmp"]
    (tmp / "pki").mkdir(exist_ok=True)
    pki = _make_pki(tmp / "pki")
    transfer_port = _free_port()
    decode = Worker("decode", cluster["config"], tmp, (
        "--tls-cert", str(pki / "decode.pem"), "--tls-key", str(pki / "decode.key"),
        "--tls-ca", str(pki / "ca.pem"), "--transfer-port", str(transfer_port)))
    prefill = Worker("prefill", cluster["config"], tmp, (
        "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "prefill.pem"),
        "--tls-key", str(pki / "prefill.key"), "--tls-server-name", "decode.baton.test"))
    try:
        decode.wait_serving()
        prefill.wait_serving()
        assert decode.load().transfer_port == transfer_port
        pair = {"decode": decode, "prefill": prefill}
        prompt = _prompt(40, 21)
        answer, tokens, _, _ = _run(pair, prompt, max_tokens=4)
        assert answer.transferred_bytes > 0 and tokens[0] == answer.first_token.token_id
        ids = torch.tensor([prompt + tokens[:1]])
        with torch.no_grad():
            logits = reference_model(ids)[0, len(prompt) - 1]
        assert tokens[0] == int(logits.argmax())
        # The plaintext port does not take state at all.
        from baton.workers.transfer import FailureReason, FirstToken, GrpcTransport
        from baton.workers.transfer import TransferError as Err

        sender = GrpcTransport(decode.load().fingerprint).open(
            decode.address, "plain", "plain", 3, 0, time.time() + 10,
            _binding(SimpleNamespace(reservation_token="t" * 32, prompt_chain_hash=b"")))
        with pytest.raises(Err) as err:
            sender.finish(FirstToken(1))
        assert err.value.reason is FailureReason.REFUSED  # UNIMPLEMENTED on that port
    finally:
        prefill.stop()
        decode.stop()


def _greedy_matches_recompute(reference_model, prompt: list[int], tokens: list[int]) -> None:
    """Greedy tokens equal a full recompute (no cache anywhere) where its margin is clear."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = reference_model(ids)[0].float()
    for step, token in enumerate(tokens):
        row = logits[len(prompt) - 1 + step]
        top2 = torch.topk(row, 2).values
        if top2[0] - top2[1] > 1e-3:
            assert token == int(row.argmax()), step


def test_a_prefill_of_another_prompt_into_a_reservation_is_refused_and_caches_nothing(
        cluster, reference_model):
    """The cache-poisoning sequence: reserve prompt P, Prefill a different prompt Q into that
    reservation. Refused every way it can be tried, nothing of Q reaches the decode worker's
    prefix cache, and P is then served as a cache-free recompute would."""
    from baton.workers.transfer import FailureReason, GrpcTransport

    decode, prefill = cluster["decode"], cluster["prefill"]
    stub = prefill_pb2_grpc.PrefillServiceStub(prefill.channel)
    p_prompt, q_prompt = _prompt(64, 41), _prompt(64, 42)
    sampling = _sampling(4)

    def reserved_p(tag: str):
        request_id, reserved = _reserve(decode, p_prompt, sampling, f"{tag}-{uuid.uuid4().hex}")
        assert reserved.reservation_token and reserved.prompt_chain_hash == prompt_chain_hash(
            p_prompt)
        return request_id, reserved, _generate(decode, request_id, reserved, timeout=60)

    # 1. Q, presenting P's chain hash: the prefill worker sees the hash is not Q's and refuses
    #    before it dials the decode worker.
    request_id, reserved, stream = reserved_p("poison-hash")
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(_prefill_request(decode, request_id, q_prompt, sampling, reserved),
                     timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another prompt" in err.value.details()
    stream.cancel()
    # 2. Q with Q's own chain hash and P's valid token: the decode worker's reservation refuses
    #    the handshake (before any state is written) and the Generate call fails.
    request_id, reserved, stream = reserved_p("poison-token")
    forged = _prefill_request(decode, request_id, q_prompt, sampling, reserved)
    forged.prompt_chain_hash = prompt_chain_hash(q_prompt)
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(forged, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as gen_err:
        list(stream)
    assert gen_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another prompt" in gen_err.value.details()
    # 3. Straight to TransferState, without the token (a guessed one), P's chain hash and Q's
    #    state: refused at the handshake; nothing written.
    from baton.workers.transfer import ReservationBinding

    request_id, reserved, stream = reserved_p("poison-guess")
    sender = GrpcTransport(decode.load().fingerprint).open(
        decode.address, reserved.reservation_id, request_id, len(p_prompt), 0,
        time.time() + 30, ReservationBinding("0" * 32, reserved.prompt_chain_hash))
    assert _send_kv(sender, len(p_prompt)).reason is FailureReason.REFUSED
    with pytest.raises(grpc.RpcError) as gen_err:
        list(stream)
    assert "token" in gen_err.value.details()
    # 4. A Prefill without a token is refused outright.
    missing = _prefill_request(decode, request_id, p_prompt, sampling, reserved)
    missing.reservation_token = ""
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(missing, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reservation_token" in err.value.details()
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)
    # Nothing of Q (nor of P: no transfer into P's reservations passed) is in the decode
    # worker's prefix cache.
    for prompt in (q_prompt, p_prompt + [7]):
        request_id, reserved = _reserve(decode, prompt, sampling)
        assert reserved.cached_tokens == 0
        decode_pb2_grpc.DecodeServiceStub(decode.channel).Release(
            decode_pb2.ReleaseRequest(reservation_id=reserved.reservation_id), timeout=10)
    # P is served as a full recompute (no cache anywhere) serves it.
    out = serve(prefill, decode, p_prompt, sampling)
    assert len(out.tokens) == 4
    _greedy_matches_recompute(reference_model, p_prompt, out.tokens)
    _wait_until(lambda: decode.load().kv_cache_usage_ratio == 0.0)


_SECRET = "internal-admin-answer-7f3a"


def test_a_failed_transfer_never_echoes_the_remote_answer(cluster):
    """A decode_target that is not a decode worker: its answer's text never comes back."""
    from concurrent import futures

    called = threading.Event()

    def transfer_state(request_iterator, context):
        called.set()
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, _SECRET)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "baton.decode.v1.DecodeService", {"TransferState": grpc.stream_unary_rpc_method_handler(
            transfer_state, request_deserializer=lambda b: b,
            response_serializer=lambda b: b)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        prompt = _prompt(20, 43)
        request = prefill_pb2.PrefillRequest(
            request_id="echo-" + uuid.uuid4().hex, prompt_token_ids=prompt,
            sampling=_sampling(2), decode_target=f"127.0.0.1:{port}",
            reservation_id="r", reservation_token="t" * 32,
            prompt_chain_hash=prompt_chain_hash(prompt))
        with pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillServiceStub(cluster["prefill"].channel).Prefill(
                request, timeout=60)
        assert called.is_set()
        assert _SECRET not in err.value.details() and "FAILED_PRECONDITION" in err.value.details()
    finally:
        server.stop(0)


def test_mutual_tls_worker_probes_in_plaintext_and_drains_only_for_the_operator(cluster):
    """A decode worker with --certs: its gRPC port refuses a plaintext caller; the plaintext
    --health-port answers health and nothing else; Drain is refused to the router's
    certificate and obeyed for the operator's, which the health port then reports."""
    from baton.operator.certs import CertificateAuthority
    from baton.workers import security

    certs = CertificateAuthority.create().write_dir(cluster["tmp"] / "tls-certs")
    health_port = _free_port()
    decode = Worker("decode", cluster["config"], cluster["tmp"],
                    extra=("--certs", str(certs), "--health-port", str(health_port)))

    def secure(role: str) -> grpc.Channel:
        return grpc.secure_channel(decode.address, security.Identity.load(
            certs, role).channel_credentials(), options=security.CHANNEL_OPTIONS)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            decode.channel = probe
            decode.wait_serving()
            with pytest.raises(grpc.RpcError) as other:
                worker_pb2_grpc.WorkerServiceStub(probe).Drain(worker_pb2.DrainRequest(),
                                                               timeout=10)
            assert other.value.code() is grpc.StatusCode.UNIMPLEMENTED
            with grpc.insecure_channel(decode.address) as plain, pytest.raises(
                    grpc.RpcError) as outsider:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10)
            assert outsider.value.code() is grpc.StatusCode.UNAVAILABLE
            with secure("router") as channel, pytest.raises(grpc.RpcError) as router:
                worker_pb2_grpc.WorkerServiceStub(channel).Drain(worker_pb2.DrainRequest(),
                                                                 timeout=10)
            assert router.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert decode.metric("baton_rpc_refused_total",
                                 method="/baton.worker.v1.WorkerService/Drain",
                                 reason="forbidden") == 1
            assert health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with secure("operator") as channel:
                worker_pb2_grpc.WorkerServiceStub(channel).Drain(worker_pb2.DrainRequest(),
                                                                 timeout=10)
            assert health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            decode.channel = grpc.insecure_channel(decode.address)
    finally:
        decode.stop()


def test_a_reserve_flood_cannot_hold_every_decode_slot(cluster):
    """16 Reserve calls that never attach a Generate, on a decode worker with 4 slots and an
    attach deadline far away: a normal request is served long before any of the flood's
    reservations could have expired (its Reserve takes back the oldest dangling one)."""
    config = json.loads(cluster["config"].read_text())
    config["decode"]["maxConcurrency"] = 4
    small = cluster["tmp"] / "small-decode.json"
    small.write_text(json.dumps(config))
    decode = Worker("decode", small, cluster["tmp"], extra=("--attach-timeout-seconds", "600"))
    try:
        decode.wait_serving()
        stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
        granted = refused = 0
        for i in range(16):
            try:
                stub.Reserve(decode_pb2.ReserveRequest(
                    request_id=f"flood-{i}", prompt_token_ids=_prompt(30, 60 + i),
                    sampling=_sampling(4)), timeout=30)
                granted += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                refused += 1
        assert granted + refused == 16 and granted >= 4
        # A normal request: its Reserve (retried while refused as full, as a router does)
        # takes back the oldest dangling reservation, and it is served.
        prompt = _prompt(12, 77)
        end = time.monotonic() + 60
        while True:
            try:
                request_id, reserved = _reserve(decode, prompt, _sampling(4))
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert time.monotonic() < end, "the flood kept every slot"
                time.sleep(0.05)  # a bounded poll (a router's retry) for the asserted state
        stream = _generate(decode, request_id, reserved, timeout=120)
        answer = prefill_pb2_grpc.PrefillServiceStub(cluster["prefill"].channel).Prefill(
            _prefill_request(decode, request_id, prompt, _sampling(4), reserved), timeout=120)
        tokens = [t.token_id for m in stream for t in m.tokens]
        assert len(tokens) == 4 and tokens[0] == answer.first_token.token_id
        assert "reclaimed: no Generate call attached" in decode.log()
    finally:
        decode.stop()


def test_sigterm_drains_in_flight_streams_then_exits_zero(cluster):
    decode, prefill = cluster["decode"], cluster["prefill"]
    prompt = _prompt(30, 8)
    sampling = _sampling(200, ignore_eos=True)
    request_id, reserved = _reserve(decode, prompt, sampling, "drain-" + uuid.uuid4().hex)
    stream = _generate(decode, request_id, reserved, timeout=60)
    decode.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(decode.channel)
    _wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.NOT_SERVING)
    assert decode.load().draining
    # New work is refused while the reserved request still gets its state and finishes.
    with pytest.raises(grpc.RpcError) as err:
        _reserve(decode, _prompt(30, 9), _sampling(4), "late")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    prefill_pb2_grpc.PrefillServiceStub(prefill.channel).Prefill(
        _prefill_request(decode, request_id, prompt, sampling, reserved), timeout=60)
    tokens = [t.token_id for m in stream for t in m.tokens]
    assert len(tokens) == 200
    assert decode.proc.wait(30) == 0
    assert "drained; stopping" in decode.log()

    # A Drain call stops admission but keeps the process; SIGTERM then ends it.
    control = worker_pb2_grpc.WorkerServiceStub(prefill.channel)
    assert control.Drain(worker_pb2.DrainRequest(), timeout=5).draining
    assert prefill.load().draining
    health = health_pb2_grpc.HealthStub(prefill.channel)
    assert (health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            == health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.RpcError) as err:
        prefill_pb2_grpc.PrefillServiceStub(prefill.channel).Prefill(prefill_pb2.PrefillRequest(
            request_id="after-drain", prompt_token_ids=prompt, sampling=_sampling(4),
            decode_target=decode.address), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert prefill.proc.poll() is None
    prefill.proc.send_signal(signal.SIGTERM)
    assert prefill.proc.wait(30) == 0
