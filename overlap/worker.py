"""One tensor-parallel rank: builds its model shard, captures decode CUDA graphs, and serves
commands from the engine process over a pipe until told to stop.

Token timestamps are taken here, on rank 0, the moment a step's tokens are on the host
(`time.perf_counter_ns`, CLOCK_MONOTONIC, shared by every process), and sent back once per
generation: no per-token IPC sits inside the measured inter-token latency.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback


def die_with_parent() -> None:
    """Linux: get SIGKILL when the engine process dies, so no rank outlives it (Ctrl-C, crash)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def rank_main(rank: int, world: int, port: int, address: str) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process decides; it kills us if needed
    from multiprocessing.connection import Client

    host, lport = address.rsplit(":", 1)
    conn = Client((host, int(lport)), authkey=bytes.fromhex(os.environ.pop("LLM_BENCH_AUTHKEY")))
    conn.send(rank)
    spec = conn.recv()
    if os.getppid() != spec["parent_pid"]:
        os._exit(1)  # the engine process died before PDEATHSIG was armed
    try:
        runner = _build(rank, world, port, spec)
        conn.send(("ready", runner.describe()))
    except BaseException as e:  # noqa: BLE001 - reported to the engine process, then exit
        _report(conn, e)
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
            elif cmd == "collective":
                conn.send(("ok", runner.collective_bench(*msg[1:])))
            elif cmd == "crash":  # for tests of crash handling: die like a segfaulting rank would
                if rank == msg[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except BaseException as e:  # noqa: BLE001
            _report(conn, e)
            sys.stdout.flush()
            os._exit(1)


def _report(conn, e: BaseException) -> None:
    from .config import ConfigError
    from .streams import ModeNotApplicable

    kind = "error"
    if isinstance(e, ModeNotApplicable):
        kind = "mode"
    elif isinstance(e, ConfigError):
        kind = "config"
    elif "out of memory" in str(e).lower():
        kind = "oom"
    try:
        conn.send(("error", kind, f"{type(e).__name__}: {e}", traceback.format_exc()))
    except (OSError, EOFError):
        pass


def _build(rank: int, world: int, port: int, spec: dict):
    import torch
    import torch.distributed as dist

    from .runner import Runner

    if spec["device"] == "cuda":
        device = torch.device("cuda", spec["gpu_ids"][rank])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "gloo"
    if world > 1:
        kw = {"device_id": device} if backend == "nccl" else {}
        from datetime import timedelta

        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=spec["timeout_s"]), **kw)
    return Runner(rank, world, device, spec)


if __name__ == "__main__":
    if len(sys.argv) != 5 or "LLM_BENCH_AUTHKEY" not in os.environ:
        sys.exit("overlap.worker is started by overlap.engine.TPEngine, not by hand")
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
