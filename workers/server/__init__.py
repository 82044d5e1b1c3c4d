"""baton.workers.server: the `baton worker prefill|decode` processes.

    baton worker prefill|decode --config FILE --pool NAME --grpc-port 50051 --metrics-port 9400
                                [--host H] [--drain-seconds S] [--cache-memory BYTES]

A prefill worker serves baton.prefill.v1.PrefillService: it runs prompts in batches and
streams each layer's state to the decode worker the router named. A decode worker serves
baton.decode.v1.DecodeService: it reserves room, receives the state (TransferState) and
streams tokens from its continuous batch (Generate). Both serve baton.worker.v1.WorkerService
(Load, Drain), grpc.health.v1 (NOT_SERVING while loading or draining) and Prometheus
/metrics on the metrics port. The model runs on CUDA when present, else on the CPU; the
engine dtype "auto" is bf16 on a GPU and fp32 on a CPU. With `expertParallel: N` in its
role's section the worker is one replica of N ranks: it starts N - 1 follower processes
(rank r on cuda:r, or gloo processes on a CPU) that hold their share of the experts and
replay every engine call of rank 0, which alone serves gRPC (replica.py).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Entry point of `baton worker` (the CLI imports this lazily)."""
    import os

    # gRPC's core logs every connection event at INFO otherwise; read when grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from baton.workers.server.process import main as run

    return run(argv)
