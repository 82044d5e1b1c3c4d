"""`baton router --config FILE --prefill SERVICE --decode SERVICE --port 8000`.

SERVICE is "host:port[,host:port...]" (a static list) or one "name:port" (a headless Service,
resolved again every --discovery-interval seconds). The model's tokenizer is read from the
configuration's modelPath. SIGTERM / Ctrl-C: the listener closes at once; requests in flight
get up to requestTimeoutSeconds to finish, then are closed, which cancels their work on the
workers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from baton.operator.spec import SpecError, WorkerConfig
from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.router.balancer import Balancer
from baton.workers.router.disaggregated import DisaggregatedBackend
from baton.workers.router.discovery import WorkerPool, resolver_for
from baton.workers.router.server import Router, RouterSettings, start_site
from baton.workers.router.tokenization import CheckpointTokenizer
from baton.workers.startup import freeze_startup_heap

log = logging.getLogger("baton.router")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="baton router", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="worker configuration JSON (WorkerConfig)")
    p.add_argument("--prefill", required=True, help="prefill workers: host:port[,...] or a "
                   "headless Service name:port")
    p.add_argument("--decode", required=True, help="decode workers, like --prefill")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    p.add_argument("--discovery-interval", type=float, default=1.0,
                   help="seconds between worker resolution and health/load checks")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def build_router(cfg: WorkerConfig, prefill: str, decode: str,
                 discovery_interval_s: float = 1.0) -> Router:
    backend = DisaggregatedBackend(
        WorkerPool("prefill", resolver_for(prefill), interval_s=discovery_interval_s),
        WorkerPool("decode", resolver_for(decode), interval_s=discovery_interval_s),
        Balancer(cfg.router.routing, block_size=cfg.engine.kv_page_size,
                 snapshot_interval=cfg.engine.prefix_cache.snapshot_interval_tokens),
        transfer_timeout_s=cfg.router.transfer_timeout_seconds,
        local_prefill_max_tokens=cfg.router.local_prefill_max_tokens)
    settings = RouterSettings(
        served_model_name=cfg.served_model_name, max_model_len=cfg.engine.max_model_len,
        request_timeout_s=cfg.router.request_timeout_seconds,
        max_queued_requests=cfg.router.max_queued_requests,
        api_keys_file=cfg.router.api_keys_file,
        max_body_bytes=cfg.router.max_request_body_bytes,
        body_budget_bytes=cfg.router.request_body_budget_bytes, reasoning=cfg.router.reasoning)
    metrics = BatonMetrics(MetricLabels(namespace=cfg.namespace, model=cfg.model,
                                        role="router"))
    return Router(backend, CheckpointTokenizer(cfg.model_path), settings, metrics)


async def serve(router: Router, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_site(router.app(), host, port,
                                     shutdown_timeout_s=router.settings.request_timeout_s)
    freeze_startup_heap()
    log.info("router serving %s on http://%s:%d/v1", router.settings.served_model_name,
             host, bound)
    try:
        await stop.wait()
        log.info("router stopping: no new connections; requests in flight may finish "
                 "within %g s", router.settings.request_timeout_s)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = WorkerConfig.load(args.config)
        router = build_router(cfg, args.prefill, args.decode, args.discovery_interval)
    except (OSError, SpecError, ValueError) as exc:
        print(f"baton router: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(router, args.host, args.port))
    return 0
