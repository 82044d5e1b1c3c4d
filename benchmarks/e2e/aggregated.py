"""The aggregated baseline: one process whose EngineLoop runs prefill and decode together,
behind the same OpenAI front end the router serves (baton.workers.router.server.Router).

    python benchmarks/e2e/aggregated.py --config WORKER_CONFIG.json --port 8000
        [--host 127.0.0.1] [--cache-memory BYTES] [--device cuda]

Only the backend differs from the disaggregated deployment: instead of a prefill worker
handing state to a decode worker over gRPC, `EngineBackend` submits each request to one
in-process engine, which chunks prompts into its continuous batch beside the running decodes
(the engine is the decode worker's: maxConcurrency sequences, steps of up to
max(prefill maxBatchTokens, maxConcurrency) tokens). Same tokenizer, HTTP/SSE path, queueing
and metrics, so the comparison isolates where prefill runs. SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from baton.operator.spec import SpecError, WorkerConfig
from baton.workers.engine import (
    Engine,
    EngineDraining,
    EngineLoop,
    Request,
)
from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.router.backend import (
    BackendStatus,
    GenerationRequest,
    NoReadyWorker,
    TokenOutput,
    WorkerFailure,
)
from baton.workers.router.server import Router, RouterSettings, start_site
from baton.workers.router.tokenization import CheckpointTokenizer
from baton.workers.server import settings

log = logging.getLogger("baton.bench.aggregated")
ROLE = "aggregated"


class EngineBackend:
    """A router Backend over one in-process EngineLoop (prefill and decode in one engine)."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check_ready(self) -> None:
        if self.loop.draining:
            raise NoReadyWorker(ROLE)

    def status(self) -> BackendStatus:
        st = self.loop.stats()
        return BackendStatus(ready=not self.loop.draining, workers={ROLE: [{
            "running": st.running, "waiting": st.waiting,
            "kvCacheUsage": round(st.kv_cache_usage, 4)}]})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        # The router's SamplingParams is the engine's: no conversion (the workers' is the
        # proto round trip, SamplingParams.to_proto / from_proto).
        engine_request = Request(request.request_id, list(request.prompt_ids),
                                 request.sampling)
        try:
            # submit waits for the engine thread to take the request: not on the event loop.
            stream = await asyncio.to_thread(self.loop.submit, engine_request)
        except EngineDraining:
            raise NoReadyWorker(ROLE) from None
        except ValueError as err:
            raise WorkerFailure(f"request {request.request_id} refused: {err}") from None
        try:
            async for event in stream:
                yield TokenOutput(token_id=event.token_id, logprob=event.logprob,
                                  top_logprobs=tuple(event.top_logprobs),
                                  finish_reason=event.finish_reason)
        finally:
            stream.close()  # a client that went away frees its cache


def load_engine(cfg: WorkerConfig, device: torch.device, cache_memory: int | None) -> EngineLoop:
    """The decode worker's engine (same sizing rules) on one device."""
    from baton.workers.model import load_model
    from baton.workers.text.tokenizer import load_tokenizer

    dtype = settings.pick_dtype(cfg.engine.dtype, device)
    model = load_model(cfg.model_path, dtype=dtype, device=device, kernels="auto",
                       max_model_len=cfg.engine.max_model_len)
    tokenizer = load_tokenizer(cfg.model_path)
    budget = settings.cache_budget(cfg, device, cache_memory)
    page_size = cfg.engine.kv_page_size
    engine_cfg = settings.engine_config(cfg, "decode", budget)
    engine_cfg.eos_token_ids = list(tokenizer.eos_token_ids or []) or None
    engine = Engine(model, engine_cfg, grammar_tokenizer=tokenizer)  # as the workers
    st = engine.stats()
    log.info("loaded %s on %s (%s): %d KV pages of %d tokens, %d state slots, steps of %d "
             "tokens", cfg.model_path, device, dtype, st.num_pages, page_size, st.num_slots,
             engine_cfg.max_batch_tokens)
    return EngineLoop(engine, name="baton-aggregated-engine")


def build_router(cfg: WorkerConfig, loop: EngineLoop) -> Router:
    router_settings = RouterSettings(
        served_model_name=cfg.served_model_name, max_model_len=cfg.engine.max_model_len,
        request_timeout_s=cfg.router.request_timeout_seconds,
        max_queued_requests=cfg.router.max_queued_requests)
    metrics = BatonMetrics(MetricLabels(namespace=cfg.namespace, model=cfg.model,
                                        role="router"))
    return Router(EngineBackend(loop), CheckpointTokenizer(cfg.model_path), router_settings,
                  metrics)


async def serve(router: Router, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_site(router.app(), host, port, shutdown_timeout_s=5.0)
    log.info("aggregated engine serving %s on http://%s:%d/v1",
             router.settings.served_model_name, host, bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="worker configuration JSON")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cache-memory", type=int, default=None,
                   help="bytes for KV pages and state slots (default: as a worker sizes it)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port: {args.port} is not in 0..65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = WorkerConfig.load(args.config)
    except (OSError, SpecError) as exc:
        print(f"aggregated: {exc}", file=sys.stderr)
        return 2
    engine_loop = load_engine(cfg, settings.pick_device(args.device), args.cache_memory)
    try:
        asyncio.run(serve(build_router(cfg, engine_loop), args.host, args.port))
    finally:
        engine_loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
