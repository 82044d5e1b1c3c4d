"""Worker pieces that need no model: flags, device/dtype choice, cache sizing, health,
proto -> engine conversions."""

from __future__ import annotations

import contextlib
from concurrent import futures

import grpc
import pytest
import torch

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.worker.v1 import worker_pb2
from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from baton.workers.sampling_params import SamplingParams
from baton.workers.server import runtime, settings
from baton.workers.server.decode import DecodeServicer
from baton.workers.server.health import HealthServicer


def test_flags_parse_and_bad_ones_are_named(capsys, tmp_path):
    args = settings.parse_args(["decode", "--config", "c.json", "--pool", "hopper",
                                "--grpc-port", "5", "--metrics-port", "6",
                                "--cache-memory", "512Mi"])
    assert (args.role, args.pool, args.grpc_port, args.metrics_port) == ("decode", "hopper", 5, 6)
    assert args.cache_memory_bytes == 512 << 20 and args.host == "0.0.0.0"
    assert args.tls is None
    # The reservation bounds' defaults (a Reserve flood), and the prefill side's decode peers.
    assert args.attach_timeout_seconds == 2.0 and args.max_open_reservations is None
    bounded = settings.parse_args(["decode", "--config", "c", "--pool", "p",
                                   "--attach-timeout-seconds", "0.5",
                                   "--max-open-reservations", "3"])
    assert (bounded.attach_timeout_seconds, bounded.max_open_reservations) == (0.5, 3)
    peers = settings.parse_args(["prefill", "--config", "c", "--pool", "p", "--decode-target",
                                 "decode.ns.svc", "--decode-target", "10.0.0.7"])
    assert peers.decode_targets == ("decode.ns.svc", "10.0.0.7")
    tls = settings.parse_args(["decode", "--config", "c", "--pool", "p", "--tls-cert", "c.pem",
                               "--tls-key", "k.pem", "--transfer-port", "50052"]).tls
    assert tls.transfer_port == 50052 and tls.ca is None
    with pytest.raises(ValueError, match="--tls-cert='c.pem' cannot be read"):
        tls.read("cert")
    for bad, message in ((["gpu", "--config", "c", "--pool", "p"], "invalid choice"),
                         (["decode", "--pool", "p"], "--config"),
                         (["decode", "--config", "c", "--pool", "p", "--grpc-port", "70000"],
                          "--grpc-port=70000"),
                         (["decode", "--config", "c", "--pool", "p", "--tls-cert", "a",
                           "--tls-key", "b"], "--transfer-port"),
                         (["prefill", "--config", "c", "--pool", "p", "--tls-cert", "a",
                           "--tls-key", "b"], "--tls-ca"),
                         (["prefill", "--config", "c", "--pool", "p", "--tls-ca", "a",
                           "--tls-cert", "b"], "go together"),
                         (["decode", "--config", "c", "--pool", "p",
                           "--attach-timeout-seconds", "0"], "--attach-timeout-seconds=0.0"),
                         (["decode", "--config", "c", "--pool", "p",
                           "--max-open-reservations", "0"], "--max-open-reservations=0")):
        with pytest.raises(SystemExit):
            settings.parse_args(bad)
        assert message in capsys.readouterr().err


def test_dtype_auto_follows_the_device():
    assert settings.pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert settings.pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert settings.pick_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="engine.dtype='fp4'"):
        settings.pick_dtype("fp4", torch.device("cpu"))


def test_engine_config_carries_the_prefix_cache_and_the_budget():
    from baton.operator.spec import WorkerConfig

    config = WorkerConfig.from_dict({
        "model": "m", "modelPath": "/m", "engine": {"kvPageSize": 16, "prefixCache": {
            "snapshotMemoryFraction": "0.3", "snapshotIntervalTokens": 512}},
        "decode": {"maxConcurrency": 4, "speculativeTokens": 2},
        "pools": {"prefill": [{"name": "p"}], "decode": [{"name": "p"}]}})
    decode = settings.engine_config(config, "decode", 1 << 20)
    assert (decode.cache_memory_bytes, decode.num_pages, decode.prefix_cache) == (
        1 << 20, None, True)
    assert (decode.snapshot_memory_fraction, decode.snapshot_interval) == (0.3, 512)
    assert decode.speculative_tokens == 2 and decode.max_num_seqs == 4
    prefill = settings.engine_config(config, "prefill", 1 << 20)
    assert prefill.speculative_tokens == 0 and prefill.max_num_seqs == settings.PREFILL_MAX_SEQS
    off = WorkerConfig.from_dict({**config.to_dict(), "engine": {
        **config.to_dict()["engine"], "prefixCache": {"enabled": False}}})
    assert settings.engine_config(off, "decode", 1 << 20).prefix_cache is False


def test_engine_config_takes_cuda_graphs_from_the_worker_config():
    from baton.operator.spec import WorkerConfig

    on = WorkerConfig.from_dict({"model": "m", "modelPath": "/m"})
    off = WorkerConfig.from_dict({"model": "m", "modelPath": "/m",
                                  "engine": {"cudaGraphs": False}})
    for role in ("prefill", "decode"):
        assert settings.engine_config(on, role, 8).enforce_eager is False
        assert settings.engine_config(off, role, 8).enforce_eager is True


def test_engine_config_takes_compile_from_the_worker_config():
    from baton.operator.spec import WorkerConfig

    off = WorkerConfig.from_dict({"model": "m", "modelPath": "/m"})
    on = WorkerConfig.from_dict({"model": "m", "modelPath": "/m", "engine": {"compile": True}})
    for role in ("prefill", "decode"):
        assert settings.engine_config(on, role, 8).compile is True
        assert settings.engine_config(off, role, 8).compile is False


def test_sampling_conversion_validates():
    def request(prompt, **sampling):
        return decode_pb2.ReserveRequest(request_id="r", prompt_token_ids=prompt,
                                          sampling=worker_pb2.SamplingParams(**sampling))

    params = SamplingParams.from_proto(worker_pb2.SamplingParams(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop_token_ids=[2],
        logprobs=True, top_logprobs=2))
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (5, 0.5, 3, 7)
    assert params.logprobs == 2 and params.stop_token_ids == [2]
    unseeded = SamplingParams.from_proto(worker_pb2.SamplingParams(max_tokens=1))
    assert unseeded.seed is None and unseeded.top_p == 1.0 and unseeded.logprobs is None
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_proto(worker_pb2.SamplingParams(max_tokens=1, temperature=-1))
    with pytest.raises(ValueError, match="max_tokens"):
        runtime.request_from_proto(request([1, 2], max_tokens=0))
    with pytest.raises(ValueError, match="empty"):
        runtime.request_from_proto(request([], max_tokens=3))
    with pytest.raises(ValueError, match="request_id"):
        runtime.request_from_proto(decode_pb2.ReserveRequest(
            prompt_token_ids=[1], sampling=worker_pb2.SamplingParams(max_tokens=3)))


def test_health_check_and_watch_follow_the_status():
    servicer = HealthServicer(("baton.decode.v1.DecodeService",))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        check = lambda name="": stub.Check(health_pb2.HealthCheckRequest(service=name)).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        servicer.set_serving(True)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert check("baton.decode.v1.DecodeService") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            check("other.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        servicer.set_serving(False)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        listed = stub.List(health_pb2.HealthListRequest()).statuses
        assert set(listed) == {"", "baton.decode.v1.DecodeService"}
        servicer.close()
        watch.cancel()
    finally:
        server.stop(None)


def test_worker_exits_with_a_clear_error_on_bad_config(tmp_path):
    import json
    import subprocess
    import sys

    config = tmp_path / "worker.json"
    base = {"model": "tiny", "modelPath": str(tmp_path / "missing"),
            "pools": {"prefill": [{"name": "local"}], "decode": [{"name": "local"}]}}
    config.write_text(json.dumps(base))
    cmd = [sys.executable, "-m", "baton.workers.cli", "worker", "decode", "--config",
           str(config), "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0"]
    out = subprocess.run(cmd + ["--pool", "elsewhere"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "'elsewhere' is not a decode pool" in out.stderr and "local" in out.stderr
    out = subprocess.run(cmd + ["--pool", "local"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "cannot serve" in out.stderr and "missing" in out.stderr
    # A taken port is an error, never a port shared with another worker.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = [a if a != "0" or cmd[i - 1] != "--grpc-port" else str(port)
                for i, a in enumerate(cmd)]
        out = subprocess.run(busy + ["--pool", "local"], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def _prefill_servicer_with(future, aborted: list):
    from types import SimpleNamespace

    from baton.workers.server.prefill import PrefillServicer

    loop = SimpleNamespace(run_prefill=lambda req, sender, sink_from=0: future,
                           abort=aborted.append)
    return PrefillServicer(SimpleNamespace(loop=loop, metrics=None))


def test_decode_target_must_be_a_told_decode_worker():
    """A Prefill names the decode worker to send state to: with --decode-target, only those
    hosts (or what they resolve to) are dialled; a bad target is refused before any dial."""
    from types import SimpleNamespace

    from baton.workers.server.prefill import PrefillServicer
    from baton.workers.server.runtime import CallEnded

    runtime = SimpleNamespace(loop=None, metrics=None)
    told = PrefillServicer(runtime, decode_targets=("localhost", "10.0.0.7"))
    told._check_target("10.0.0.7:50051")
    told._check_target("127.0.0.1:50051")  # what localhost resolves to
    for target, code in (("10.0.0.8:50051", grpc.StatusCode.PERMISSION_DENIED),
                         ("169.254.169.254:80", grpc.StatusCode.PERMISSION_DENIED),
                         ("nowhere.invalid:1", grpc.StatusCode.PERMISSION_DENIED),
                         ("10.0.0.7", grpc.StatusCode.INVALID_ARGUMENT),
                         ("10.0.0.7:http", grpc.StatusCode.INVALID_ARGUMENT),
                         (":50051", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(CallEnded) as ended:
            told._check_target(target)
        assert ended.value.code == code and ended.value.outcome == "rejected", target
    # Not told (the default): any host:port, still well formed.
    PrefillServicer(runtime)._check_target("10.0.0.8:50051")


@pytest.mark.parametrize("started", [True, False])
def test_a_prefill_its_caller_cancelled_ends_cancelled_without_an_error_log(started, caplog):
    """The router cancels Prefill when its client goes away: the engine aborts the prefill
    (PrefillAborted), or the call ended before the handler ran. Either way the outcome is
    'cancelled', the transfer is aborted, and nothing is logged as an error."""
    import logging
    import time

    from baton.workers.engine import PrefillAborted, Request
    from baton.workers.server.runtime import CallEnded

    future = futures.Future()
    future.set_exception(PrefillAborted("prefill of 'gone' aborted"))
    aborted: list = []
    servicer = _prefill_servicer_with(future, aborted)
    sender_aborts: list = []
    sender = type("Sender", (), {"abort": lambda self, reason: sender_aborts.append(reason)})()
    context = type("Context", (), {"add_callback": lambda self, callback: started})()
    with caplog.at_level(logging.DEBUG), pytest.raises(CallEnded) as ended:
        servicer._run(Request("gone", [1, 2, 3]), sender, context, time.monotonic(),
                      time.time() + 30, 0)
    assert ended.value.outcome == "cancelled"
    assert ended.value.code == grpc.StatusCode.CANCELLED
    assert len(sender_aborts) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cache_sizes_that_cannot_fit_name_the_spec_field():
    """The worker builds its engine through the engine's one sizing function and names the
    Model field to change."""
    from pathlib import Path

    from baton.operator.spec import WorkerConfig
    from baton.workers.server import replica

    tiny = Path(__file__).resolve().parents[3] / "examples" / "tiny"

    def config(**prefix):
        return WorkerConfig.from_dict({
            "model": "tiny", "modelPath": str(tiny),
            "engine": {"maxModelLen": 256, "kvPageSize": 16, "prefixCache": prefix},
            "decode": {"maxConcurrency": 2},
            "pools": {"prefill": [{"name": "p"}], "decode": [{"name": "p"}]}})

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"spec.engine.prefixCache.snapshotMemoryFraction: "
                                         r"\d+ bytes of cache memory on this decode worker"):
        replica.build_engine(config(snapshotMemoryFraction="0.001"), "decode", cpu,
                             torch.float32, 1 << 20)
    with pytest.raises(ValueError, match=r"spec.engine.cacheMemoryFraction \(or "
                                         r"--cache-memory\): 4096 bytes"):
        replica.build_engine(config(), "prefill", cpu, torch.float32, 4096)
    engine, engine_cfg = replica.build_engine(config(), "decode", cpu, torch.float32, 8 << 20)
    st = engine.stats()
    assert st.num_snapshots >= 1 and engine_cfg.snapshot_interval == 1024
    sizes = engine.sizes
    used = (st.num_pages * sizes.bytes_per_page + st.num_slots * sizes.bytes_per_slot
            + st.num_snapshots * sizes.bytes_per_snapshot)
    assert 0.9 * (8 << 20) < used <= 8 << 20


class _Counted:
    """What DecodeServicer.Generate needs of its runtime, counting through the runtime's own
    call_finished (an error on a call its caller left is a cancellation)."""

    def __init__(self):
        self.outcomes: list[str] = []
        self.metrics = self

    def request_finished(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    @property
    def request_duration(self):
        return self

    def observe(self, _seconds: float) -> None:
        pass

    def admit(self, _context, draining_ok: bool = False):
        return contextlib.nullcontext()

    def call_finished(self, outcome, context, arrival):
        runtime.WorkerRuntime.call_finished(self, outcome, context, arrival)


class _LeftContext:
    """A call whose caller has gone (as after the router's cancel)."""

    def is_active(self) -> bool:
        return False


def _generate_messages(finish_last: int):
    servicer = object.__new__(DecodeServicer)
    servicer.runtime = _Counted()
    messages = [decode_pb2.GenerateResponse(tokens=[worker_pb2.GeneratedToken(token_id=7)]),
                decode_pb2.GenerateResponse(tokens=[worker_pb2.GeneratedToken(token_id=8)],
                                            finish_reason=finish_last)]
    servicer._generate = lambda request, context: iter(messages)
    return servicer, servicer.Generate(decode_pb2.GenerateRequest(), _LeftContext())


@pytest.mark.parametrize("finish, outcome", [
    (decode_pb2.FINISH_REASON_LENGTH, "success"), (decode_pb2.FINISH_REASON_STOP, "success"),
    (decode_pb2.FINISH_REASON_ABORT, "cancelled")])
def test_generate_served_to_its_last_message_counts_once_the_caller_ends_the_call(finish,
                                                                                   outcome):
    """The router cancels its Generate call as soon as it has the finish; gRPC then closes the
    handler at its last yield. The request was served (an aborted one was not)."""
    servicer, stream = _generate_messages(finish)
    assert [m.finish_reason for m in (next(stream), next(stream))][-1] == finish
    stream.close()  # what gRPC does to the handler of a cancelled call
    assert servicer.runtime.outcomes == [outcome]


def test_generate_left_before_its_last_message_is_a_cancellation():
    servicer, stream = _generate_messages(decode_pb2.FINISH_REASON_LENGTH)
    next(stream)
    stream.close()
    assert servicer.runtime.outcomes == ["cancelled"]
    servicer, stream = _generate_messages(decode_pb2.FINISH_REASON_LENGTH)
    assert len(list(stream)) == 2  # read to its end
    assert servicer.runtime.outcomes == ["success"]
