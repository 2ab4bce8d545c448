"""Decode-sized all-reduces on N GPUs of one host, one process per GPU: correctness first, then
microseconds per call inside a CUDA graph of back-to-back calls (like the 64 all-reduces of one
Llama-3-8B decode step), median over graph replays (CUDA events; rank 0's median and the slowest
rank's). Prints one JSON line per check and per measurement, then a table.

    python scripts/bench_allreduce.py --tp 2 [--rows 1 16] [--hidden 4096] [--calls 64] [--replays 50]

What is compared, bf16, per row count:
  nccl            dist.all_reduce (NVLS off)
  symm            the engine's path today (overlap/comm.py): copy into the symmetric buffer +
                  torch.ops.symm_mem.one_shot_all_reduce_out
  symm+norm       symm, then the residual add + RMSNorm that follows it in the model: the Triton
                  one-row kernel (overlap/gemv.py) at 1 row, model.add_rms_norm (torch) at more
  lamport         overlap/allreduce_norm.py's one-shot all-reduce (no barrier: data is the flag)
  lamport+norm    the same fused with the residual add + RMSNorm, one kernel
Triton kernels run with and without programmatic dependent launch (PDL). Correctness: each result
against an fp32 reference (sum of the ranks' parts gathered in fp32), beside NCCL's, and whether
every rank got the same bits; a check that fails stops the run before any timing (exit 1).
The process group rendezvous is a file (nothing listens); NVLink multicast is off.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `overlap` without an install; the ranks (spawned) run this too

EPS = 1e-5
TOL = 1e-2  # largest difference / largest reference value: bf16 rounds to 2**-8 of a value, at most twice


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def _same_on_all_ranks(t: torch.Tensor, world: int) -> bool:
    # As int32: NCCL has no 16-bit integer type.
    bits = t.contiguous().view(torch.int16).flatten().to(torch.int32)
    allb = torch.empty(world * bits.numel(), dtype=torch.int32, device=t.device)
    dist.all_gather_into_tensor(allb, bits)
    allb = allb.view(world, -1)
    return bool((allb == allb[0]).all().item())


def _per_call_us(fn, calls: int, replays: int) -> float:
    """Median us per call over `replays` back-to-back replays of a graph of `calls` calls of `fn`.
    Replays are not synchronised with the host in between, so after the first the ranks run in step
    and a replay measures the calls, not the ranks' launch skew."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    dist.barrier()
    for _ in range(3):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for s, e in ev:
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3 / calls


def _methods(comm, lams: dict, part: torch.Tensor, x: torch.Tensor, w: torch.Tensor, pdl: bool) -> dict:
    """name -> call returning the result or (residual, normed), for PDL on or off (Triton kernels)."""
    from overlap import gemv
    from overlap.model import add_rms_norm

    def symm_norm():
        d = comm.all_reduce(part)
        if part.numel() == part.shape[-1]:
            return gemv.add_rms_norm(x, d, w, EPS, pdl=pdl)
        return add_rms_norm(x, d, w, EPS)
    return {
        "symm": lambda: comm.all_reduce(part),
        "symm+norm": symm_norm,
        "lamport": lambda: lams[pdl].all_reduce(part),
        "lamport+norm": lambda: lams[pdl].all_reduce_add_rms_norm(part, x, w, EPS),
    }


def _worker(rank: int, world: int, init_file: str, a: argparse.Namespace) -> None:
    from overlap.allreduce_norm import LamportAllReduce
    from overlap.comm import Comm

    torch.cuda.set_device(rank)
    dev, dt = torch.device("cuda", rank), torch.bfloat16
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=dev)
    out = rank == 0

    def emit(rec: dict) -> None:
        if out:
            print(json.dumps(rec), flush=True)

    comm = Comm(rank, world, dev, dt, "symm")
    lams = {pdl: LamportAllReduce(rank, world, dev, dt, a.hidden, max(a.rows), dist.group.WORLD.group_name, pdl=pdl)
            for pdl in (True, False)}
    lam = lams[True]
    emit({"gpu": torch.cuda.get_device_name(dev), "world": world, "torch": torch.__version__,
          "nccl": ".".join(map(str, torch.cuda.nccl.version())), "lamport_buffer_bytes": lam.memory_bytes()})

    results = []
    for rows in a.rows:
        g = torch.Generator().manual_seed(1000 + rank)  # each rank's own part
        part = torch.randn(rows, 1, a.hidden, generator=g).to(dev, dt)
        g = torch.Generator().manual_seed(7)  # the residual stream and the weight are replicated
        x = torch.randn(rows, 1, a.hidden, generator=g).to(dev, dt)
        w = (1 + 0.1 * torch.randn(a.hidden, generator=g)).to(dev, dt)
        allp = torch.empty(world, *part.shape, device=dev)
        dist.all_gather_into_tensor(allp, part.float().contiguous())
        ref_sum = allp.sum(0)
        ref_res = x.float() + ref_sum
        ref_h = ref_res * torch.rsqrt(ref_res.pow(2).mean(-1, keepdim=True) + EPS) * w.float()

        methods = _methods(comm, lams, part, x, w, True)
        # 1. Correctness, PDL as the engine runs it.
        nccl_sum = part.clone()
        dist.all_reduce(nccl_sum)
        ok = True
        checks = {"nccl": (nccl_sum,)}
        for name, fn in methods.items():
            r = fn()
            checks[name] = r if isinstance(r, tuple) else (r,)
        torch.cuda.synchronize()
        lam.check()
        for name, outs in checks.items():
            rec = {"check": name, "rows": rows}
            if len(outs) == 1:
                rec["rel_err_vs_fp32"] = _rel(outs[0], ref_sum)
                rec["max_abs_diff_vs_nccl"] = (outs[0].float() - nccl_sum.float()).abs().max().item()
            else:
                rec["residual_rel_err_vs_fp32"] = _rel(outs[0], ref_res)
                rec["normed_rel_err_vs_fp32"] = _rel(outs[1], ref_h)
                if name == "lamport+norm":
                    cur = checks["symm+norm"]
                    rec["max_abs_diff_vs_symm+norm"] = max((p.float() - q.float()).abs().max().item()
                                                           for p, q in zip(outs, cur, strict=True))
            rec["same_bits_on_all_ranks"] = all(_same_on_all_ranks(o, world) for o in outs)
            errs = [v for k, v in rec.items() if k.endswith("rel_err_vs_fp32")]
            rec["ok"] = max(errs) <= TOL and (rec["same_bits_on_all_ranks"] or not name.startswith("lamport"))
            ok &= rec["ok"]
            emit(rec)
        if not ok:
            raise RuntimeError(f"rank {rank}: a correctness check failed at {rows} rows; no timing")

        # 2. Timing.
        y = part.clone()  # NCCL in place on a scratch copy: the values grow, the time does not change
        timed = [("nccl", None, functools.partial(dist.all_reduce, y)), ("symm", None, methods["symm"])]
        one_row = part.numel() == part.shape[-1]  # the Triton add+RMSNorm (with PDL) runs at one row only
        for pdl in (True, False):
            fns = _methods(comm, lams, part, x, w, pdl)
            timed += [(name, pdl if (name != "symm+norm" or one_row) else None, fns[name])
                      for name in ("symm+norm", "lamport", "lamport+norm")
                      if pdl or name != "symm+norm" or one_row]
        for name, pdl, fn in timed:
            us = _per_call_us(fn, a.calls, a.replays)
            worst = torch.tensor([us], device=dev)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            rec = {"rows": rows, "hidden": a.hidden, "method": name, "pdl": pdl, "us_per_call": round(us, 3),
                   "us_per_call_slowest_rank": round(worst.item(), 3), "calls_per_graph": a.calls,
                   "replays": a.replays}
            results.append(rec)
            emit(rec)
        for lam_ in lams.values():
            lam_.check()
    if out:
        print(f"\n{'rows':>4}  {'method':<13} {'PDL on':>8} {'PDL off':>8}  (us per call, rank 0, median)")
        for rows in a.rows:
            for name in ("nccl", "symm", "symm+norm", "lamport", "lamport+norm"):
                by = {r["pdl"]: r["us_per_call"] for r in results if r["rows"] == rows and r["method"] == name}
                on = by.get(True, by.get(None))
                off = by.get(False)
                print(f"{rows:>4}  {name:<13} {on:>8.2f} {'-' if off is None else f'{off:.2f}':>8}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="GPUs (one process each)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=64, help="all-reduces per graph (64 per 8B decode step)")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=300, help="seconds before the ranks are stopped")
    a = ap.parse_args()
    from llm_bench.procs import NCCL_SAFE_ENV

    os.environ.update(NCCL_SAFE_ENV)  # before CUDA, NCCL or symmetric memory start; the ranks inherit it
    if a.tp < 2 or a.tp > torch.cuda.device_count():
        print(f"bench_allreduce: --tp {a.tp} must be at least 2 and at most the {torch.cuda.device_count()} "
              "visible GPUs", file=sys.stderr)
        return 2
    if min(a.rows) < 1 or a.hidden < 1 or a.calls < 1 or a.replays < 1:
        print("bench_allreduce: --rows, --hidden, --calls and --replays must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(a.tp, os.path.join(tmp, "pg"), a), nprocs=a.tp, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + a.timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    print(f"bench_allreduce: ranks still running after {a.timeout:.0f} s; stopped", file=sys.stderr)
                    return 1
        except mp.ProcessRaisedException as e:
            print(f"bench_allreduce: a rank failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        except mp.ProcessExitedException as e:
            print(f"bench_allreduce: a rank exited: {e}", file=sys.stderr)
            return 1
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(10)
                    if p.is_alive():
                        p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
