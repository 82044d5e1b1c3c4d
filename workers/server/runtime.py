"""What both worker roles share: the loaded model and engine loop, metrics, admission while
loading or draining, in-flight accounting, and proto <-> engine conversions."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import grpc

from baton.operator.spec import WorkerConfig
from baton.proto.baton.worker.v1 import worker_pb2
from baton.workers.engine import EngineStats, Request, SamplingParams, TokenEvent
from baton.workers.metrics import BatonMetrics, MetricLabels, WorkerStats
from baton.workers.server import settings
from baton.workers.transfer import model_fingerprint

log = logging.getLogger(__name__)


class CallEnded(Exception):
    """Ends an RPC with a gRPC status after its outcome (a requests_total label) is counted."""

    def __init__(self, outcome: str, code: grpc.StatusCode, message: str,
                 trailing_metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.outcome = outcome
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


class WorkerRuntime:
    """One worker's engine and bookkeeping; the gRPC servicers hold one of these."""

    def __init__(self, args: settings.WorkerArgs, config: WorkerConfig):
        self.args = args
        self.role = args.role
        self.config = config
        config.pool(args.role, args.pool)  # ValueError naming the known pools
        self.device = settings.pick_device(args.device)
        self.dtype = settings.pick_dtype(config.engine.dtype, self.device)
        self.metrics = BatonMetrics(
            MetricLabels(namespace=config.namespace, model=config.model, role=args.role,
                         pool=args.pool), stats=self.worker_stats)
        self.loop = None
        self.replicated = False
        """The engine loop replays its calls on expert-parallel follower ranks."""
        self.followers = None
        self.ranks = None
        self.fingerprint = ""
        self.page_size = config.engine.kv_page_size
        self.draining = False
        self._ready = False
        self._in_flight = 0
        self._cond = threading.Condition()
        self.state_bytes: dict[str, int] = {}
        """Bytes of each state kind a transfer carries: per token for kv / mtp_kv, per request
        for conv / ssm / hidden (what a prefix-cache hit saves)."""

    # -- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Loads the model, sizes the caches and starts the engine loop; with
        expertParallel > 1 it first starts the follower ranks (see replica.py)."""
        from baton.workers.engine import EngineLoop
        from baton.workers.server import replica

        cfg = self.config
        path = cfg.model_path
        world_size = replica.expert_parallel(cfg, self.role)
        ranks = None
        if world_size > 1:
            replica.check_devices(self.role, world_size, self.device)
            self.device = replica.rank_device(self.device, 0)
            self.followers = replica.Followers(self.args, world_size, self.device)
            ranks = replica.Ranks(0, world_size, self.followers.init_method, self.device)
            self.ranks = ranks
        engine, engine_cfg = replica.build_engine(cfg, self.role, self.device, self.dtype,
                                                  self.args.cache_memory_bytes, ranks)
        self.state_bytes = engine.cache.transfer_bytes(int(engine.model.config.hidden_size))
        self.fingerprint = model_fingerprint(path, {
            "dtype": str(self.dtype), "ssm_dtype": str(engine.cache.ssm_dtype),
            "max_model_len": engine.max_model_len,
            "eos_token_ids": sorted(engine.eos_ids)})
        st = engine.stats()
        self.loop = EngineLoop(engine, name=f"baton-{self.role}-engine",
                               channel=ranks.channel if ranks is not None else None)
        self.replicated = ranks is not None
        log.info("loaded %s on %s (%s): %d KV pages of %d tokens, %d state slots, %d prefix-"
                 "cache snapshots, %d expert-parallel rank(s), fingerprint %s", path,
                 self.device, self.dtype, st.num_pages, self.page_size, st.num_slots,
                 st.num_snapshots, world_size, self.fingerprint[:16])

    def close(self) -> int:
        """Stops the engine loop and the follower ranks; 0, or 1 when the ranks had parted
        (sampled different tokens) or a follower did not exit cleanly."""
        from baton.workers.server import replica

        status = 0
        if self.followers is not None:
            self.followers.expect_exit()
        if self.loop is not None:
            self.loop.stop()
        if self.replicated:
            try:
                if not self.loop.shutdown_followers():
                    status = 1
            except Exception:
                log.exception("telling the expert-parallel ranks to exit failed")
                status = 1
        if self.followers is not None:
            # Without a replicated engine (the load failed) the followers wait in a
            # collective that will never come: stop them at once.
            told = self.replicated
            codes = self.followers.stop(replica.FOLLOWER_EXIT_SECONDS if told else 0.0)
            if told and any(code != 0 for code in codes):
                log.error("expert-parallel followers exited with %s", codes)
                status = 1
        if self.ranks is not None:
            self.ranks.close()
        return status

    def call_finished(self, outcome: str, context: grpc.ServicerContext,
                      arrival: float) -> None:
        """Counts a finished Generate/Prefill call; an error on a call its caller already left
        is a cancellation."""
        if outcome == "error" and not context.is_active():
            outcome = "cancelled"
        self.metrics.request_finished(outcome)
        self.metrics.request_duration.observe(time.monotonic() - arrival)

    def set_ready(self) -> None:
        with self._cond:
            self._ready = True

    # -- admission -----------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, context: grpc.ServicerContext, draining_ok: bool = False):
        """Counts one in-flight call; refuses new ones while loading or (unless draining_ok:
        work admitted before the drain began) draining."""
        with self._cond:
            if not self._ready:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker is loading")
            if self.draining and not draining_ok:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker is draining")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def count_held(self, delta: int) -> None:
        """A reservation held between calls (+1) or let go (-1): a drain waits for it."""
        with self._cond:
            self._in_flight += delta
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def count_saved_transfer(self, num_prompt: int, cached: int, local: bool) -> None:
        """State bytes a reservation kept off the wire: the KV (and MTP KV) of its cached
        prefix; with a local prefill, everything a transfer would have carried."""
        sizes = self.state_bytes
        kv_tokens = num_prompt if local else cached
        mtp_tokens = num_prompt - 1 if local else max(cached - 1, 0)
        saved = {"kv": kv_tokens * sizes.get("kv", 0),
                 "mtp_kv": mtp_tokens * sizes.get("mtp_kv", 0)}
        if local:
            saved.update({kind: sizes.get(kind, 0) for kind in ("conv", "ssm", "hidden")})
        for kind, nbytes in saved.items():
            if nbytes:
                self.metrics.state_transfer_saved_bytes(kind, nbytes)

    def start_draining(self) -> None:
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Waits until no call is in flight; False if some still are at the timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._in_flight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- load reporting ------------------------------------------------------------------

    def engine_stats(self) -> EngineStats:
        return self.loop.stats() if self.loop is not None else EngineStats()

    def worker_stats(self) -> WorkerStats:
        st = self.engine_stats()
        return WorkerStats(
            requests_waiting=st.waiting + st.reserved,
            requests_running=st.running,
            kv_cache_usage_ratio=st.kv_cache_usage,
            ssm_state_slots_usage_ratio=st.ssm_slot_usage,
            prompt_tokens_total=st.prompt_tokens_total,
            generation_tokens_total=st.generation_tokens_total,
            spec_decode_draft_tokens_total=st.spec_draft_tokens_total,
            spec_decode_accepted_tokens_total=st.spec_accepted_tokens_total,
            prefix_cache_queried_tokens_total=st.prefix_queried_tokens_total,
            prefix_cache_hit_tokens_total=st.prefix_hit_tokens_total,
            prefix_cache_snapshot_usage_ratio=st.snapshot_usage,
            prefix_cache_snapshot_evictions_total=st.snapshot_evictions_total,
            prefix_cache_page_evictions_total=st.page_evictions_total,
            local_prefills_total=st.local_prefills_total)

    def load_response(self, transfers_in_flight: int,
                      transfer_port: int = 0) -> worker_pb2.LoadResponse:
        st = self.engine_stats()
        role = worker_pb2.ROLE_PREFILL if self.role == "prefill" else worker_pb2.ROLE_DECODE
        return worker_pb2.LoadResponse(
            role=role, running=st.running, waiting=st.waiting + st.reserved,
            kv_cache_usage_ratio=st.kv_cache_usage,
            ssm_state_slots_usage_ratio=st.ssm_slot_usage, free_slots=st.free_slots,
            free_kv_tokens=st.free_pages * self.page_size, draining=self.draining,
            transfers_in_flight=transfers_in_flight, fingerprint=self.fingerprint,
            transfer_port=transfer_port)

    # -- deadlines -----------------------------------------------------------------------

    def deadline_of(self, message, context: grpc.ServicerContext | None) -> float:
        """Absolute time.time() deadline: the message's, the call's (unless None: a Reserve
        call ends long before its request), or the default."""
        candidates = [time.time() + self.config.router.request_timeout_seconds]
        if message.HasField("deadline"):
            candidates.append(message.deadline.ToNanoseconds() / 1e9)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            candidates.append(time.time() + remaining)
        return min(candidates)


MAX_CACHE_SALT_BYTES = 64  # the router sends a 32-byte digest
MAX_SNAPSHOT_POINTS = 16
"""Snapshot points one request may carry (the router sends a few message boundaries)."""


def request_from_proto(message) -> Request:
    """The engine Request of a Generate/Prefill message (ValueError names the bad field)."""
    request_id = message.request_id
    if not request_id:
        raise ValueError("request_id must be a non-empty string")
    prompt = [int(t) for t in message.prompt_token_ids]
    if not prompt:
        raise ValueError(f"prompt_token_ids of {request_id!r} is empty")
    num_output = int(message.num_output_tokens)
    if num_output >= len(prompt):
        raise ValueError(
            f"num_output_tokens={num_output} of {request_id!r} is invalid: an earlier "
            f"attempt's output must leave at least one of the {len(prompt)} prompt tokens")
    salt = bytes(getattr(message, "cache_salt", b""))
    if len(salt) > MAX_CACHE_SALT_BYTES:
        raise ValueError(f"cache_salt of {request_id!r} has {len(salt)} bytes; at most "
                         f"{MAX_CACHE_SALT_BYTES}")
    points = tuple(int(p) for p in message.snapshot_points)
    if len(points) > MAX_SNAPSHOT_POINTS or any(
            not 0 < p < len(prompt) for p in points) or list(points) != sorted(set(points)):
        raise ValueError(
            f"snapshot_points of {request_id!r} are invalid: at most {MAX_SNAPSHOT_POINTS} "
            f"ascending offsets inside the prompt (1..{len(prompt) - 1}), got {list(points)}")
    return Request(request_id, prompt, SamplingParams.from_proto(message.sampling),
                   num_output_tokens=num_output, snapshot_points=points, cache_salt=salt)


def admitted_request(message) -> Request:
    """The engine Request of a Generate/Prefill message; CallEnded(rejected) if it is bad."""
    try:
        return request_from_proto(message)
    except ValueError as e:
        raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


def token_to_proto(token_id: int, logprob: float | None,
                   top_logprobs) -> worker_pb2.GeneratedToken:
    return worker_pb2.GeneratedToken(
        token_id=token_id, logprob=0.0 if logprob is None else float(logprob),
        top_logprobs=[worker_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top_logprobs])


def event_token(event: TokenEvent) -> worker_pb2.GeneratedToken:
    return token_to_proto(event.token_id, event.logprob, event.top_logprobs)
