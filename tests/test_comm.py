"""The all-reduce paths agree. The symmetric-memory kernel needs CUDA GPUs, so on CPU the code around it
(staging copy, reshape, size threshold, fallback to the process group, comm-free no-op) runs with a
reference one-shot in the kernel's place: every rank reads every peer's buffer and sums them in rank
order, which is what `one_shot_all_reduce_out` does. Its result must equal the process group's
all-reduce (gloo here, NCCL on GPUs) bit for bit at TP=2, where both are one addition."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_bench.procs import free_port
from overlap.comm import SYMM_MAX_BYTES, Comm
from overlap.config import EngineConfig
from overlap.engine import TPEngine

SHAPES = [(1, 1, 64), (16, 1, 4096), (3, 5, 7), (SYMM_MAX_BYTES // 4 + 1,)]  # the last is over the limit


def _rank(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        comm = Comm(rank, world, torch.device("cpu"), torch.float32, allreduce="nccl")
        kernel_sizes = []

        def reference_one_shot(buf, op, group, out):
            assert op == "sum" and group == comm.group_name and out.is_contiguous()
            kernel_sizes.append(buf.numel())
            peers = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(peers, buf)
            out.copy_(torch.stack(peers).sum(0))

        comm.symm_buf = torch.full((SYMM_MAX_BYTES // 4,), float("nan"))  # stale data must never leak out
        comm.group_name, comm.one_shot = "WORLD", reference_one_shot
        g = torch.Generator().manual_seed(rank)
        for shape in SHAPES:
            x = torch.randn(shape, generator=g)
            for inp in (x, x.transpose(0, -1)):  # contiguous and not
                want = inp.clone()
                dist.all_reduce(want)
                got = comm.all_reduce(inp.clone())
                assert got.shape == inp.shape and torch.equal(got, want), f"rank {rank} shape {tuple(inp.shape)}"
        small = [s for s in SHAPES if torch.Size(s).numel() * 4 <= SYMM_MAX_BYTES]
        assert kernel_sizes == [torch.Size(s).numel() for s in small for _ in range(2)], kernel_sizes
        comm.comm_free = True
        x = torch.randn(8, generator=g)
        assert comm.all_reduce(x) is x
    finally:
        dist.destroy_process_group()


def test_symm_path_equals_the_process_group_all_reduce():
    mp.spawn(_rank, args=(2, free_port()), nprocs=2, join=True)


def test_allreduce_choice_is_checked():
    with pytest.raises(ValueError, match="allreduce must be one of"):
        Comm(0, 1, torch.device("cpu"), torch.float32, allreduce="fast")
    with pytest.raises(RuntimeError, match="'symm' needs CUDA GPUs"):
        Comm(0, 1, torch.device("cpu"), torch.float32, allreduce="symm")


@pytest.mark.parametrize("choice", ["nccl", "auto"])
def test_engine_records_the_all_reduce_it_used(choice):
    """On CPU both choices run gloo and say so; `symm` is refused at build, naming why."""
    with TPEngine(EngineConfig(model="tiny", tp=2, allreduce=choice, engine_timeout=120)) as eng:
        d = eng.describe()
        assert (d["allreduce"], d["allreduce_requested"]) == ("gloo", choice)


def test_engine_refuses_symm_on_cpu():
    with pytest.raises(Exception, match="'symm' needs CUDA GPUs"):
        TPEngine(EngineConfig(model="tiny", tp=2, allreduce="symm", engine_timeout=120))
