"""The ranks of one worker replica: `expertParallel: N` runs N processes as one replica.

The worker process is rank 0: it owns gRPC and the engine loop. With N > 1 it starts N - 1
follower processes (`python -m baton.workers.server.replica`, one per GPU: rank r on cuda:r;
on a CPU N gloo processes), and all of them join one torch.distributed group on 127.0.0.1:

    rank 0                                    rank r (follower)
    spawn followers; init_process_group       init_process_group
    load_model(..., ep_group=WORLD)           load_model(..., ep_group=WORLD)
    agree: KV pages (the fewest any rank      agree
      can hold) and the sampling base seed
    EngineLoop(engine, channel)               follow(engine): replay rank 0's calls
    SIGTERM: drain, then shutdown message  -> exit 0 (after reporting its token digest)

The MoE collectives use the world group (NCCL on GPUs, gloo on the CPU); rank 0's control
messages travel on a second, gloo group. A follower that dies takes the replica down: rank 0
logs which rank exited and exits non-zero (Kubernetes restarts the pod); a follower whose
rank 0 is gone exits too.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from baton.operator.spec import WorkerConfig
from baton.workers.server import settings
from baton.workers.startup import freeze_startup_heap

log = logging.getLogger("baton.worker.replica")

# Exit status of rank 0 when a follower died (a process supervisor restarts the replica).
FOLLOWER_DIED_EXIT = 3
# How long ranks wait for each other in the experts' collectives, at start-up included
# (every rank loads its share of a large checkpoint, which takes minutes).
RENDEZVOUS_TIMEOUT_SECONDS = 1800.0
# Followers wait for rank 0's next call for as long as the replica is idle (gloo would fail
# the wait after the group's timeout); a rank 0 that is gone is noticed by process watch.
CONTROL_TIMEOUT_SECONDS = 10 * 365 * 86400.0
# Followers get this long to exit after the shutdown message before they are killed.
FOLLOWER_EXIT_SECONDS = 15.0


def expert_parallel(config: WorkerConfig, role: str) -> int:
    """Ranks per replica for a role (its WorkerConfig section's expertParallel)."""
    n = config.prefill.expert_parallel if role == "prefill" else config.decode.expert_parallel
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{role}.expertParallel={n!r} is invalid: an integer >= 1")
    return n


def check_devices(role: str, world_size: int, device: torch.device) -> None:
    """One GPU per rank: ValueError when this machine has fewer GPUs than ranks."""
    if device.type == "cuda" and world_size > 1:
        count = torch.cuda.device_count()
        if count < world_size:
            raise ValueError(f"{role}.expertParallel={world_size} needs {world_size} GPUs "
                             f"(one per rank); this machine has {count}")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of a rank: cuda:r on GPUs (one GPU per rank), else the CPU."""
    if device.type == "cuda":
        return torch.device("cuda", rank)
    return device


def build_engine(config: WorkerConfig, role: str, device: torch.device, dtype: torch.dtype,
                 cache_memory_bytes: int | None, ranks: Ranks | None = None):
    """Loads the model and builds this rank's Engine (the same on every rank of a replica).

    The engine sizes its caches from the budget (baton.workers.engine.sizing, the one place
    that does). With ranks, the experts are sharded over them and the ranks agree on the KV
    page and snapshot counts (the fewest any can hold) and the base seed, so their engines
    are equal. A budget that cannot fit is a ValueError naming the spec field to change."""
    from baton.workers.engine import Engine
    from baton.workers.engine.sampling import fresh_seed
    from baton.workers.engine.sizing import CacheSizeError, size_caches
    from baton.workers.model import load_model
    from baton.workers.text.tokenizer import load_tokenizer

    path = config.model_path
    model = load_model(path, dtype=dtype, device=device, kernels="auto",
                       max_model_len=config.engine.max_model_len,
                       ep_group=None if ranks is None else ranks.ep_group)
    tokenizer = load_tokenizer(path)
    budget = settings.cache_budget(config, device, cache_memory_bytes)
    engine_cfg = settings.engine_config(config, role, budget)
    engine_cfg.eos_token_ids = list(tokenizer.eos_token_ids or []) or None
    try:
        if ranks is not None:
            sizes = size_caches(model, engine_cfg, config.engine.max_model_len)
            engine_cfg.num_pages = ranks.agree_min(sizes.num_pages)
            engine_cfg.num_snapshots = ranks.agree_min(sizes.num_snapshots)
            engine_cfg.base_seed = ranks.agree_from_rank0(fresh_seed())
        # The engine detokenizes nothing (text and stop strings are the router's); grammars
        # compile against the checkpoint's tokenizer.
        return Engine(model, engine_cfg, grammar_tokenizer=tokenizer), engine_cfg
    except CacheSizeError as e:
        raise ValueError(f"{settings.SPEC_FIELDS.get(e.field, e.field)}: {budget} bytes of "
                         f"cache memory on this {role} worker do not fit: {e.detail}") from None


class Ranks:
    """This process's place in a replica's torch.distributed group."""

    def __init__(self, rank: int, world_size: int, init_method: str, device: torch.device):
        import torch.distributed as dist

        from baton.workers.engine.replicated import DistributedChannel

        self.rank = rank
        self.world_size = world_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # N ranks share the machine's cores: each takes its share, not all of them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        timeout = _timedelta(RENDEZVOUS_TIMEOUT_SECONDS)
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timeout)
        self.ep_group = dist.group.WORLD
        # Control messages are CPU objects: gloo, whatever the experts' backend is.
        self.control = dist.new_group(backend="gloo",
                                      timeout=_timedelta(CONTROL_TIMEOUT_SECONDS))
        self.channel = DistributedChannel(self.control)

    def agree_min(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def agree_from_rank0(self, value: int) -> int:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        # The groups' C++ objects (gloo's worker threads and the work they last ran) go now,
        # while the interpreter is whole: kept alive by these references until its teardown,
        # they were destroyed there, where a follower that had shut down cleanly once aborted
        # with "terminate called without an active exception" (status -6).
        self.channel = self.control = self.ep_group = None
        gc.collect()


class Followers:
    """Rank 0's follower processes: started, watched, stopped."""

    def __init__(self, args: settings.WorkerArgs, world_size: int, device: torch.device):
        self.world_size = world_size
        self.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._closing = threading.Event()
        self.procs: dict[int, subprocess.Popen] = {}
        for rank in range(1, world_size):
            cmd = [sys.executable, "-m", "baton.workers.server.replica", args.role,
                   "--config", str(args.config_path), "--pool", args.pool,
                   "--rank", str(rank), "--world-size", str(world_size),
                   "--init-method", self.init_method, "--device", str(device),
                   "--parent-pid", str(os.getpid()), "--log-level", args.log_level]
            if args.cache_memory_bytes is not None:
                cmd += ["--cache-memory", str(args.cache_memory_bytes)]
            # Followers log to rank 0's stderr, so the replica has one log. Their own session
            # keeps a terminal's Ctrl-C away from them: rank 0 drains, then tells them.
            self.procs[rank] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        self._watcher = threading.Thread(target=self._watch, name="baton-ranks", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closing.wait(0.5):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None and not self._closing.is_set():
                    log.error("expert-parallel rank %d (pid %d) exited with status %d; the "
                              "replica cannot run without it: exiting", rank, proc.pid, code)
                    # The engine may be blocked in a collective with the dead rank: only a
                    # process exit gets the replica restarted reliably.
                    _exit_now(FOLLOWER_DIED_EXIT)

    def expect_exit(self) -> None:
        """From here on a follower that exits is stopping, not dying."""
        self._closing.set()

    def stop(self, timeout: float = FOLLOWER_EXIT_SECONDS) -> list[int | None]:
        """Waits for the followers to exit (killing those that do not); their statuses."""
        self._closing.set()
        end = time.monotonic() + timeout
        codes = []
        for rank, proc in self.procs.items():
            try:
                codes.append(proc.wait(max(end - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                log.warning("expert-parallel rank %d did not exit in %.0f s; killing it",
                            rank, timeout)
                proc.kill()
                codes.append(proc.wait())
        return codes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def _exit_now(status: int) -> None:
    """Exits the process at once, without the interpreter's teardown, logs flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _watch_parent(parent_pid: int) -> None:
    """Exits this follower when rank 0 is gone (it would wait for messages forever)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            log.error("rank 0 (pid %d) is gone; exiting", parent_pid)
            _exit_now(1)


def follower_main(argv: list[str]) -> int:
    """A follower rank: load, replay rank 0's engine calls, exit on its shutdown message."""
    parser = argparse.ArgumentParser(prog="python -m baton.workers.server.replica",
                                     description="An expert-parallel follower rank of a "
                                                 "worker (started by rank 0).")
    parser.add_argument("role", choices=settings.ROLES)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--rank", required=True, type=int)
    parser.add_argument("--world-size", required=True, type=int)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--parent-pid", required=True, type=int)
    parser.add_argument("--cache-memory", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    if not 0 < ns.rank < ns.world_size:
        parser.error(f"--rank={ns.rank} is not in 1..{ns.world_size - 1}")
    logging.basicConfig(level=getattr(logging, ns.log_level), stream=sys.stderr,
                        format=f"%(asctime)s {ns.role}[{ns.pool}] rank {ns.rank} "
                               "%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(ns.parent_pid,), daemon=True).start()
    from baton.workers.engine.replicated import follow

    config = WorkerConfig.load(ns.config)
    device = rank_device(torch.device(ns.device), ns.rank)
    dtype = settings.pick_dtype(config.engine.dtype, device)
    ranks = Ranks(ns.rank, ns.world_size, ns.init_method, device)
    try:
        engine, _ = build_engine(config, ns.role, device, dtype, ns.cache_memory, ranks)
        log.info("expert-parallel rank %d of %d loaded on %s; following rank 0", ns.rank,
                 ns.world_size, device)
        freeze_startup_heap()
        digest = follow(engine, ranks.channel)
        steps, tokens, _ = digest.summary()
        log.info("rank 0 shut the replica down after %d steps, %d tokens", steps, tokens)
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    # Shut down cleanly, with nothing left to release: the interpreter's teardown would only
    # destroy the model's and engine's references to the groups, where gloo can abort.
    _exit_now(follower_main(sys.argv[1:]))
