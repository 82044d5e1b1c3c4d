"""State transfer throughput: the gRPC transfer path vs a raw TCP socket, same bytes, same
two processes, one run.

    python benchmarks/transfer/bench_transfer.py [--requests 6] [--rounds 3] [--device cuda]

A receiver process serves DecodeService.TransferState (baton.workers.transfer, the code the
decode worker runs) and, beside it, a plain TCP listener. The sending process moves the state
of Nemotron-3-Nano-shaped requests (per request: 23 Mamba layers of conv + SSM state in fp32,
6 attention layers of KV for a 4096-token prompt in bf16, about 72 MiB) to it, first through
GrpcTransport (chunks, an XXH3-64 checksum per chunk, handshake, acknowledgement), then
through the socket (a length header and the raw bytes, recv_into the destination). Both paths
end with the bytes in a destination tensor in the receiver (on --device: with cuda, state
starts and ends in GPU memory). Both processes freeze their start-up heap as workers do.
Rounds alternate the two paths; the table reports the median rate of each, and the result is
written to benchmarks/results/<date>-<host>-transfer.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

# Nemotron 3 Nano: Mamba 64 heads x 64, state 128, 8 groups, conv kernel 4; 2 KV heads of 128.
MAMBA_LAYERS, ATTENTION_LAYERS = 23, 6
CONV_DIM = 64 * 64 + 2 * 8 * 128
SSM_SHAPE = (64, 64, 128)
KV_HEADS, HEAD_DIM = 2, 128
PROMPT_TOKENS = 4096
ATTENTION_AT = (4, 9, 14, 19, 24, 28)
FLOOR_SERVICE = "baton.bench.v1.Floor"


def request_states(device: str):
    import torch

    from baton.workers.engine import LayerState, StateKind

    g = torch.Generator().manual_seed(0)
    states = []
    for layer in range(MAMBA_LAYERS + ATTENTION_LAYERS):
        if layer in ATTENTION_AT:
            kv = torch.randn(2, PROMPT_TOKENS, KV_HEADS, HEAD_DIM, generator=g).bfloat16()
            states.append(LayerState(layer, StateKind.KV, 0, PROMPT_TOKENS, kv.to(device)))
        else:
            conv = torch.randn(CONV_DIM, 3, generator=g)
            ssm = torch.randn(*SSM_SHAPE, generator=g)
            states.append(LayerState(layer, StateKind.CONV, 0, PROMPT_TOKENS, conv.to(device)))
            states.append(LayerState(layer, StateKind.SSM, 0, PROMPT_TOKENS, ssm.to(device)))
    return states


def _nbytes(states) -> int:
    return sum(s.tensor.numel() * s.tensor.element_size() for s in states)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the receiving process -------------------------------------------------------------------


def receiver_main(conn, device: str, chunk_bytes: int) -> None:
    import grpc
    import torch

    from baton.workers.startup import freeze_startup_heap
    from baton.workers.transfer import CHANNEL_OPTIONS, StateReceiver, TransferStateHandler

    # This process only moves bytes; torch's parallel copies would fight the gRPC threads.
    torch.set_num_threads(1)
    states = request_states("cpu")
    # The destination: one tensor per state, like a decode worker's reserved pages and slot.
    dest = [torch.empty_like(s.tensor, device=device) for s in states]
    freeze_startup_heap()  # as a decode worker does once loaded
    pinned = device == "cuda"

    class Target:
        def __init__(self):
            self.index = 0
            self.done = threading.Event()

        def bind(self, token, chain_hash):
            pass  # the binding is the decode servicer's check, not what this measures

        def write(self, state):
            dest[self.index].copy_(state.tensor, non_blocking=False)
            self.index += 1

        def complete(self, first_token, cached_tokens=0):
            if device == "cuda":
                torch.cuda.synchronize()
            self.done.set()

        def fail(self, error):
            print(f"receiver: transfer failed: {error}", file=sys.stderr, flush=True)
            self.done.set()

    receiver = StateReceiver("bench")
    server = grpc.server(futures.ThreadPoolExecutor(8), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "baton.decode.v1.DecodeService",
        {"TransferState": TransferStateHandler(receiver).method_handler()}),))

    def floor_push(messages, _context):
        # The floor of any gRPC path in Python: grpcio's own cost per byte, nothing else.
        return struct.pack("<Q", sum(len(m) for m in messages))

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        FLOOR_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(floor_push)}),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    conn.send((grpc_port, listener.getsockname()[1]))

    def tcp_serve():
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        staging = [torch.empty(d.numel() * d.element_size(), dtype=torch.uint8,
                               pin_memory=pinned) for d in dest]
        header = bytearray(8)
        while True:
            for i, d in enumerate(dest):
                view = memoryview(header)
                got = 0
                while got < 8:
                    n = sock.recv_into(view[got:])
                    if n == 0:
                        return
                    got += n
                (size,) = struct.unpack("<Q", header)
                buf = staging[i] if pinned else d.view(-1).view(torch.uint8)
                view = memoryview(buf.numpy()).cast("B")
                got = 0
                while got < size:
                    got += sock.recv_into(view[got:], size - got)
                if pinned:
                    d.view(-1).view(torch.uint8).copy_(staging[i], non_blocking=True)
            if pinned:
                torch.cuda.synchronize()
            sock.sendall(b"k")

    threading.Thread(target=tcp_serve, daemon=True).start()
    while True:
        command = conn.recv()
        if command[0] == "expect":
            targets = []
            for request_id in command[1]:
                target = Target()
                receiver.expect(request_id, request_id, PROMPT_TOKENS, 0, target,
                                time.time() + 600)
                targets.append(target)
            conn.send("ok")
        elif command[0] == "cpu":
            conn.send(_cpu_seconds())
        elif command[0] == "stop":
            server.stop(None)
            return


# -- the sending process ---------------------------------------------------------------------


def run_grpc(transport, address: str, states, request_ids, concurrency: int) -> float:
    from baton.workers.transfer import FirstToken, ReservationBinding

    def one(request_id: str) -> None:
        sender = transport.open(address, request_id, request_id, PROMPT_TOKENS, 0,
                                time.time() + 600, ReservationBinding("t" * 32, b"h" * 32))
        for state in states:
            sender.on_layer(state)
        sender.finish(FirstToken(1))

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(one, r) for r in request_ids]:
            f.result()
    return time.perf_counter() - start


def run_floor(channel, messages: list[bytes], n_requests: int, concurrency: int) -> float:
    push = channel.stream_unary(f"/{FLOOR_SERVICE}/Push")
    expected = sum(len(m) for m in messages)

    def one(_: int) -> None:
        (got,) = struct.unpack("<Q", push(iter(messages), timeout=600))
        assert got == expected, (got, expected)

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    return time.perf_counter() - start


def run_tcp(sock, states, n_requests: int, device: str) -> float:
    import torch

    pinned = [torch.empty(s.tensor.numel() * s.tensor.element_size(), dtype=torch.uint8,
                          pin_memory=True) for s in states] if device == "cuda" else None
    start = time.perf_counter()
    for _ in range(n_requests):
        for i, s in enumerate(states):
            raw = s.tensor.contiguous().view(-1).view(torch.uint8)
            if pinned is not None:
                pinned[i].copy_(raw)
                raw = pinned[i]
            sock.sendall(struct.pack("<Q", raw.numel()))
            sock.sendall(memoryview(raw.numpy()).cast("B"))
        assert sock.recv(1) == b"k"
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="requests in flight at once on the gRPC path (streams)")
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                        / "results")
    args = parser.parse_args(argv)

    import torch

    from baton.workers.startup import freeze_startup_heap
    from baton.workers.transfer import GrpcTransport

    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, args.device, args.chunk_bytes),
                       daemon=True)
    proc.start()
    grpc_port, tcp_port = parent.recv()
    states = request_states(args.device)
    per_request = _nbytes(states)
    transport = GrpcTransport("bench", chunk_bytes=args.chunk_bytes,
                              max_queued_bytes=max(64 << 20, 2 * args.chunk_bytes))
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    address = f"127.0.0.1:{grpc_port}"
    # The floor path's messages: the same bytes in chunk-sized pieces, built before timing.
    import grpc

    from baton.workers.transfer import CHANNEL_OPTIONS

    floor_channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    floor_messages = [bytes(memoryview(s.tensor.cpu().contiguous().view(-1).view(torch.uint8)
                                       .numpy())[o:o + args.chunk_bytes])
                      for s in states
                      for o in range(0, s.tensor.numel() * s.tensor.element_size(),
                                     args.chunk_bytes)]
    freeze_startup_heap()  # as a prefill worker does once loaded

    # Warm-up: connections, thread pools and page faults out of the timed rounds.
    parent.send(("expect", ["warm"]))
    parent.recv()
    run_grpc(transport, address, states, ["warm"], 1)
    run_tcp(sock, states, 1, args.device)
    run_floor(floor_channel, floor_messages, 1, 1)

    def cpu_both() -> float:
        parent.send(("cpu",))
        return _cpu_seconds() + parent.recv()

    grpc_rates, tcp_rates, floor_rates = [], [], []
    cpu = {"grpc": 0.0, "tcp": 0.0, "floor": 0.0}
    total = per_request * args.requests
    for r in range(args.rounds):
        ids = [f"r{r}-{i}" for i in range(args.requests)]
        parent.send(("expect", ids))
        parent.recv()
        c0 = cpu_both()
        grpc_rates.append(total / run_grpc(transport, address, states, ids, args.concurrency))
        c1 = cpu_both()
        tcp_rates.append(total / run_tcp(sock, states, args.requests, args.device))
        c2 = cpu_both()
        floor_rates.append(total / run_floor(floor_channel, floor_messages, args.requests,
                                             args.concurrency))
        c3 = cpu_both()
        cpu["grpc"] += c1 - c0
        cpu["tcp"] += c2 - c1
        cpu["floor"] += c3 - c2
    parent.send(("stop",))
    sock.close()
    transport.close()
    floor_channel.close()
    proc.join(10)

    load_after = os.getloadavg()
    g, t = statistics.median(grpc_rates), statistics.median(tcp_rates)
    f = statistics.median(floor_rates)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else platform.processor() or platform.machine())
    moved = total * args.rounds / 1e9
    rows = [("gRPC transfer (baton.workers.transfer)", g, grpc_rates, cpu["grpc"] / moved),
            ("raw TCP socket", t, tcp_rates, cpu["tcp"] / moved),
            ("floor: grpcio streaming prebuilt byte messages (no checksum, no header, "
             "no destination)", f, floor_rates, cpu["floor"] / moved)]
    lines = [
        f"# State transfer: gRPC path vs raw TCP ({datetime.date.today().isoformat()})",
        "",
        f"- host: {platform.node()}, {device_name}, {mp.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"- device: {args.device} (state starts and ends in {args.device} memory)",
        f"- per request: {per_request / 2**20:.1f} MiB ({MAMBA_LAYERS} Mamba layers conv + "
        f"SSM fp32, {ATTENTION_LAYERS} attention layers KV bf16 x {PROMPT_TOKENS} tokens)",
        f"- {args.rounds} rounds x {args.requests} requests, the three paths in turn; gRPC: "
        f"{args.chunk_bytes >> 20} MiB chunks with XXH3-64 checksums, {args.concurrency} "
        "requests in flight",
        f"- 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the "
        "machine is shared; the paths ran under the same load, in turn)",
        "",
        "| path | median GB/s | rounds (GB/s) | CPU s per GB (both processes) |",
        "|---|---:|---|---:|",
    ]
    for name, median, rates, cpu_per_gb in rows:
        lines.append(f"| {name} | {median / 1e9:.2f} | "
                     f"{', '.join(f'{x / 1e9:.2f}' for x in rates)} | {cpu_per_gb:.2f} |")
    lines += ["", f"gRPC / raw TCP: **{g / t:.0%}** of the rate (median of rounds); "
              f"raw TCP needs {rows[1][3] / rows[0][3]:.0%} of the gRPC path's CPU time per "
              "byte. The floor (grpcio alone, the same messages prebuilt, nothing done with "
              f"them) reaches {f / t:.0%} of raw TCP: the ceiling of any path through grpcio "
              "on this machine.",
              ""]
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    host = platform.node().split(".")[0] or "host"
    path = args.out / f"{datetime.date.today().isoformat()}-{host}-transfer.md"
    path.write_text(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
