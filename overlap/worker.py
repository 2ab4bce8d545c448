"""One tensor-parallel rank: builds its model shard, captures decode CUDA graphs, and serves
commands from the engine process over a pipe until told to stop.

Token timestamps are taken here, on rank 0, the moment a step's tokens are on the host
(`time.perf_counter_ns`, CLOCK_MONOTONIC, shared by every process), and sent back once per
generation: no per-token IPC sits inside the measured inter-token latency.
"""
from __future__ import annotations

import os
import signal
import sys

from llm_bench.procs import connect, report


def rank_main() -> None:
    conn, rank, world, spec = connect("overlap.worker")
    try:
        runner = _build(rank, world, spec)
        conn.send(("ready", runner.describe()))
    except BaseException as e:  # noqa: BLE001 - reported to the engine process, then exit
        report(conn, e)
        sys.stdout.flush()
        os._exit(1)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        cmd = msg[0]
        if cmd == "stop":
            sys.stdout.flush()
            # No destroy_process_group(): after symmetric-memory use it was seen to hang the exit.
            os._exit(0)
        try:
            if cmd == "generate":
                conn.send(("ok", runner.generate(*msg[1:])))
            elif cmd == "profile":
                conn.send(("ok", runner.profiled_generate(*msg[1:])))
            elif cmd == "logits":
                conn.send(("ok", runner.logits(*msg[1:])))
            elif cmd == "step_logits":
                conn.send(("ok", runner.step_logits(*msg[1:])))
            elif cmd == "collective":
                conn.send(("ok", runner.collective_bench(*msg[1:])))
            elif cmd == "crash":  # for tests of crash handling: die like a segfaulting rank would
                if rank == msg[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except BaseException as e:  # noqa: BLE001
            report(conn, e)
            sys.stdout.flush()
            os._exit(1)


def _build(rank: int, world: int, spec: dict):
    import torch
    import torch.distributed as dist

    from .runner import Runner

    config = spec["config"]
    if config.device == "cuda":
        device = torch.device("cuda", config.gpu_ids[rank])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "gloo"
    if world > 1:
        from datetime import timedelta

        # A file store, not TCP: torch's TCP store listens on every interface whatever address it is
        # given; the file lives in the engine's private log folder. NCCL's own bootstrap and gloo's
        # transport are kept on loopback (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME set by the engine).
        store = dist.FileStore(spec["store"], world)
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=config.engine_timeout), **kw)
    return Runner(rank, world, device, config)


if __name__ == "__main__":
    rank_main()
