"""What a worker process runs with: its flags, the WorkerConfig, and the choices they imply
(device, dtype, cache budget, the engine's configuration)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.operator.spec import WorkerConfig

ROLES = ("prefill", "decode")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Prefill-only requests hold cache only while their prompt runs; this many prompts may be in
# the prefill engine at once (batched into steps up to maxBatchTokens).
PREFILL_MAX_SEQS = 32
# A CPU worker shares the machine with the other workers and the router: its cache takes at
# most this much unless --cache-memory says otherwise.
CPU_CACHE_CAP_BYTES = 2 << 30


@dataclass(frozen=True)
class WorkerArgs:
    """The command line of `baton worker`."""

    role: str
    config_path: Path
    pool: str
    host: str
    grpc_port: int
    metrics_port: int
    drain_seconds: float
    cache_memory_bytes: int | None
    device: str | None
    log_level: str
    tls: TransferTls | None = None
    attach_timeout_seconds: float = 2.0
    """Decode: a reservation no Generate call attached to in this long is released."""
    max_open_reservations: int | None = None
    """Decode: most reservations without a Generate call at once (None: every slot)."""
    decode_targets: tuple[str, ...] = ()
    """Prefill: the decode workers' host names (their Service's DNS name) or addresses; a
    Prefill whose decode_target's host is not one of them, and does not resolve to one of
    their addresses, is refused before anything is dialled. Empty: any host."""


@dataclass(frozen=True)
class TransferTls:
    """TLS for the state-transfer channel (prefill -> decode), mutual when both sides have a
    certificate. Files are PEM."""

    cert: Path | None
    """This worker's certificate chain (decode: required; prefill: for mutual TLS)."""
    key: Path | None
    ca: Path | None
    """Roots that verify the peer (prefill: required; decode: then clients must present a
    certificate it signed)."""
    transfer_port: int
    """Decode: the TLS listener's port, serving only TransferState."""
    server_name: str | None
    """Prefill: the name the decode workers' certificate holds, when it is not their address."""

    def read(self, which: str) -> bytes | None:
        path = getattr(self, which)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"--tls-{which}={str(path)!r} cannot be read: {e}") from None


def parse_size(text: str) -> int:
    """Bytes of a size such as 512Mi, 2Gi or 1048576."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def parse_args(argv: list[str]) -> WorkerArgs:
    parser = argparse.ArgumentParser(
        prog="baton worker",
        description="Run a prefill or decode worker: gRPC on --grpc-port, /metrics on "
                    "--metrics-port; SIGTERM drains and exits 0.")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--config", required=True, type=Path,
                        help="worker configuration JSON (the ConfigMap / `baton up`)")
    parser.add_argument("--pool", required=True, help="GPU pool name (the `pool` label)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=9400)
    parser.add_argument("--drain-seconds", type=float, default=60.0,
                        help="longest a SIGTERM drain waits for in-flight work")
    parser.add_argument("--cache-memory", type=parse_size, default=None,
                        help="bytes for KV pages and state slots (e.g. 512Mi); default: "
                             "cacheMemoryFraction of free GPU memory, or on a CPU at most 2Gi")
    parser.add_argument("--device", default=None,
                        help="torch device; default: cuda when present, else cpu")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="DEBUG also logs every layer state sent and received")
    parser.add_argument("--attach-timeout-seconds", type=float, default=2.0,
                        help="decode: release a reservation no Generate call attached to in "
                             "this long (a router calls Generate right after Reserve)")
    parser.add_argument("--max-open-reservations", type=int, default=None,
                        help="decode: most reservations waiting for their Generate call at "
                             "once; default: decode.maxConcurrency")
    parser.add_argument("--decode-target", action="append", default=[],
                        dest="decode_targets", metavar="HOST",
                        help="prefill: a decode workers' host (a Service's DNS name or an "
                             "address); repeatable. Prefill refuses other decode_target hosts. "
                             "Default: any")
    tls = parser.add_argument_group(
        "transfer TLS", "TLS for the state-transfer channel. A decode worker with "
        "--tls-cert/--tls-key serves TransferState only on --transfer-port, over TLS; a "
        "prefill worker with --tls-ca sends over TLS (with --tls-cert/--tls-key: mutual).")
    tls.add_argument("--tls-cert", type=Path, default=None)
    tls.add_argument("--tls-key", type=Path, default=None)
    tls.add_argument("--tls-ca", type=Path, default=None)
    tls.add_argument("--transfer-port", type=int, default=None,
                     help="decode: port of the TLS transfer listener")
    tls.add_argument("--tls-server-name", default=None,
                     help="prefill: expected name in the decode workers' certificate")
    ns = parser.parse_args(argv)
    for name in ("grpc_port", "metrics_port"):
        if not 0 <= getattr(ns, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')}={getattr(ns, name)} is not in 0..65535")
    if ns.drain_seconds <= 0:
        parser.error(f"--drain-seconds={ns.drain_seconds} must be > 0")
    if ns.attach_timeout_seconds <= 0:
        parser.error(f"--attach-timeout-seconds={ns.attach_timeout_seconds} must be > 0")
    if ns.max_open_reservations is not None and ns.max_open_reservations < 1:
        parser.error(f"--max-open-reservations={ns.max_open_reservations} must be >= 1")
    transfer_tls = None
    if any(v is not None for v in (ns.tls_cert, ns.tls_key, ns.tls_ca, ns.transfer_port)):
        if (ns.tls_cert is None) != (ns.tls_key is None):
            parser.error("--tls-cert and --tls-key go together")
        if ns.role == "decode" and (ns.tls_cert is None or ns.transfer_port is None):
            parser.error("a decode worker's transfer TLS needs --tls-cert, --tls-key and "
                         "--transfer-port")
        if ns.role == "prefill" and ns.tls_ca is None:
            parser.error("a prefill worker's transfer TLS needs --tls-ca (the roots that "
                         "verify the decode workers)")
        if ns.transfer_port is not None and not 0 <= ns.transfer_port <= 65535:
            parser.error(f"--transfer-port={ns.transfer_port} is not in 0..65535")
        transfer_tls = TransferTls(cert=ns.tls_cert, key=ns.tls_key, ca=ns.tls_ca,
                                   transfer_port=ns.transfer_port or 0,
                                   server_name=ns.tls_server_name)
    return WorkerArgs(role=ns.role, config_path=ns.config, pool=ns.pool, host=ns.host,
                      grpc_port=ns.grpc_port, metrics_port=ns.metrics_port,
                      drain_seconds=ns.drain_seconds, cache_memory_bytes=ns.cache_memory,
                      device=ns.device, log_level=ns.log_level, tls=transfer_tls,
                      attach_timeout_seconds=ns.attach_timeout_seconds,
                      max_open_reservations=ns.max_open_reservations,
                      decode_targets=tuple(ns.decode_targets))


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model dtype: "auto" is bf16 on a GPU and fp32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"engine.dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def cache_budget(config: WorkerConfig, device: torch.device, override: int | None) -> int:
    """Bytes for the engine's KV pages and Mamba state slots (after the weights loaded)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--cache-memory={override} must be > 0")
        return override
    fraction = config.engine.cache_memory_fraction
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # cacheMemoryFraction bounds weights + caches together; what the weights took is
        # already gone from `free`.
        budget = free - int((1.0 - fraction) * total)
        if budget <= 0:
            raise ValueError(f"engine.cacheMemoryFraction={fraction}: the weights leave no "
                             f"room for caches ({free} of {total} bytes free)")
        return budget
    available = _available_memory()
    return max(1, min(int(fraction * available), CPU_CACHE_CAP_BYTES))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def engine_config(config: WorkerConfig, role: str, cache_memory_bytes: int):
    """The EngineConfig of a worker of `role` with a cache budget of cache_memory_bytes (the
    engine sizes its KV pages, state slots and prefix-cache snapshots from it)."""
    from baton.workers.engine import EngineConfig

    engine = config.engine
    prefix = engine.prefix_cache
    shared = dict(page_size=engine.kv_page_size, cache_memory_bytes=cache_memory_bytes,
                  max_model_len=engine.max_model_len, prefix_cache=prefix.enabled,
                  snapshot_memory_fraction=prefix.snapshot_memory_fraction,
                  snapshot_interval=prefix.snapshot_interval_tokens,
                  enforce_eager=not engine.cuda_graphs, compile=engine.compile)
    if role == "prefill":
        return EngineConfig(**shared, max_num_seqs=PREFILL_MAX_SEQS,
                            max_batch_tokens=config.prefill.max_batch_tokens,
                            speculative_tokens=0)
    k = config.decode.speculative_tokens
    seqs = config.decode.max_concurrency
    # Decode steps take 1 + k tokens per sequence; a preempted sequence (or a local prefill)
    # computes its prompt in chunks of the prefill budget.
    return EngineConfig(**shared, max_num_seqs=seqs,
                        max_batch_tokens=max(config.prefill.max_batch_tokens, seqs * (1 + k)),
                        speculative_tokens=k)


# The EngineConfig fields a cache-size error can name, as the Model's spec spells them.
SPEC_FIELDS = {
    "cache_memory_bytes": "spec.engine.cacheMemoryFraction (or --cache-memory)",
    "snapshot_memory_fraction": "spec.engine.prefixCache.snapshotMemoryFraction",
    "num_snapshots": "spec.engine.prefixCache.snapshotMemoryFraction",
    "num_pages": "spec.engine.cacheMemoryFraction (or --cache-memory)",
    "snapshot_interval": "spec.engine.prefixCache.snapshotIntervalTokens",
}


def max_num_seqs(config: WorkerConfig, role: str) -> int:
    return PREFILL_MAX_SEQS if role == "prefill" else config.decode.max_concurrency


def speculative_tokens(config: WorkerConfig, role: str) -> int:
    return 0 if role == "prefill" else config.decode.speculative_tokens
