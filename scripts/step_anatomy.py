"""Where one decode step's time goes, on one GPU at TP=1, for one engine variant: the step's GPU time
(CUDA events around back-to-back graph replays, no host turn-around), the same step launched onto an
idle GPU and waited for (`synced_*`, the shape of the `none` loop), the generate loop's TPOT (in
--overlap's loop), kernels per step and the top kernels (torch.profiler), and the matrix-vector
products alone in one graph (the bandwidth ceiling of this variant's GEMVs). Prints one JSON object.

    python scripts/step_anatomy.py --model llama3-8b --variant eager|compile [--decode-attention triton]
        [--gemv triton] [--overlap none|double_buffer] [--split-swiglu] [--attn-block-t N --attn-warps N]

`--split-swiglu` runs the gate/up projection as one GEMV and SiLU*mul as its own kernel (the engine
before the two were fused at batch 1), for an A/B on one machine. `--attn-block-t`/`--attn-warps` set
the decode-attention kernel's shape (scripts/tune_decode_attention.py measures it alone).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (overlap)

from llm_bench.engine import random_prompts
from overlap.config import EngineConfig
from overlap.model import matvec
from overlap.runner import Runner


def replay_ms(run, reps: int, before=None) -> float:
    """Median device time of `run()` over `reps` repetitions (CUDA events)."""
    times = []
    for _ in range(reps):
        if before:
            before()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def kernels(run, steps: int) -> dict:
    """Kernels per step, and each kernel by total time (name, calls per step, mean us)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in ev.name:
            per[ev.name][0] += 1
            per[ev.name][1] += ev.device_time_total
    total = sum(n for n, _ in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"kernels_per_step": total / steps,
            "top": [{"name": k[:90], "per_step": n / steps, "us_mean": t / n, "us_per_step": t / steps}
                    for k, (n, t) in top]}


def gemv_only(runner: Runner, b: int) -> dict:
    """Each weight GEMM kind alone (all layers' in one graph, through the engine's blocks: w13 with
    its SiLU*mul): us per call and bytes per second."""
    m = runner.model
    f = m.fns
    out = {}
    kinds = {k: [getattr(L, k) for L in m.layers] for k in ("wqkv", "wo", "w13", "w2")}
    kinds["lm_head"] = [m.lm_head]
    for kind, ws in kinds.items():
        x = torch.randn(b, ws[0].shape[1], device=runner.device, dtype=m.dtype)
        mm = (lambda x, w: f.swiglu_up(x, w, m.inter)) if kind == "w13" else f.matvec
        (run,) = runner.capture([lambda ws=ws, x=x, mm=mm: [mm(x, w) for w in ws]])
        us = replay_ms(run, 20) * 1e3 / len(ws)
        nbytes = ws[0].numel() * ws[0].element_size()
        out[kind] = {"us": round(us, 2), "tb_per_s": round(nbytes / us / 1e6, 3)}
    total_us = sum(v["us"] * (1 if k == "lm_head" else len(m.layers)) for k, v in out.items())
    out["step_ms"] = total_us / 1e3
    return out


def repack(m) -> None:
    """Every weight moved into one allocation, as views in the order a step reads them (an A/B of
    the allocator's one-segment-per-tensor placement, inside one process)."""
    owned = [(L, k) for L in m.layers for k in ("attn_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")]
    owned += [(m, "norm"), (m, "lm_head")]
    arena = torch.empty(sum(getattr(o, k).numel() for o, k in owned), dtype=m.dtype, device=m.device)
    off = 0
    for o, k in owned:
        t = getattr(o, k)
        v = arena[off:off + t.numel()].view_as(t)
        v.copy_(t)
        setattr(o, k, v)
        off += t.numel()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--variant", choices=("eager", "compile"), default="eager")
    ap.add_argument("--decode-attention", choices=("sdpa", "triton"), default="sdpa")
    ap.add_argument("--gemv", choices=("torch", "triton"), default="torch")
    ap.add_argument("--no-pdl", action="store_true", help="Triton kernels without programmatic dependent launch")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--overlap", choices=("none", "double_buffer"), default="none")
    ap.add_argument("--split-swiglu", action="store_true")
    ap.add_argument("--repack", action="store_true", help="then again with all weights in one allocation")
    ap.add_argument("--attn-block-t", type=int)
    ap.add_argument("--attn-warps", type=int)
    a = ap.parse_args()
    b, p, n = a.batch_size, a.prompt_len, a.max_tokens
    tune = {k: v for k, v in (("attention_block_t", a.attn_block_t), ("attention_warps", a.attn_warps)) if v}
    # What the engine sends its ranks, without the processes; no decode graph is built at start-up.
    cfg = EngineConfig(model=a.model, device="cuda", batch_sizes=(b,), max_seq=p + n,
                       compile=a.variant != "eager", decode_attention=a.decode_attention, gemv=a.gemv,
                       overlap=a.overlap, pdl=not a.no_pdl, **tune).resolved()
    t0 = time.time()
    r = Runner(0, 1, torch.device("cuda", 0), cfg, build_graphs=False)
    if a.split_swiglu:
        def split(h, w13, inter):
            g, u = matvec(h, w13).split(inter, dim=-1)
            return torch.nn.functional.silu(g) * u
        if a.variant != "eager":
            split = torch.compile(split, fullgraph=True, dynamic=False)
        r.model.fns = r.model.fns._replace(swiglu_up=split)
    t1 = time.time()
    steps = r.decode_graphs(b, False)
    build_s = time.time() - t1
    prompts = random_prompts(b, p, r.model.cfg.vocab_size, 0)
    gens = [r.generate(prompts, n) for _ in range(6)][1:]
    tpot = statistics.median((g["token_ns"][-1] - g["token_ns"][1]) / (n - 2) / 1e6 for g in gens)
    pos = r.buffers(b)["pos"]

    def round_():  # n-1 decode steps back to back, alternating the token buffers
        for i in range(n - 1):
            steps[i % 2]()
    step_ms = replay_ms(round_, 10, before=lambda: pos.fill_(p)) / (n - 1)

    def synced(reps: int = 3) -> dict:
        """The `none` loop's shape without its copies and token reads: launch one step, wait for it.
        The host's time inside replay() and the step's GPU time when it starts from an idle GPU."""
        call_us, gpu_ms, wall_ms = [], [], []
        for _ in range(reps):
            pos.fill_(p)
            for i in range(n - 1):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter_ns()
                s.record()
                steps[i % 2]()
                t1 = time.perf_counter_ns()
                e.record()
                e.synchronize()
                t2 = time.perf_counter_ns()
                call_us.append((t1 - t0) / 1e3)
                gpu_ms.append(s.elapsed_time(e))
                wall_ms.append((t2 - t0) / 1e6)
        med = statistics.median
        return {"replay_call_us": med(call_us), "synced_step_gpu_ms": med(gpu_ms), "synced_step_wall_ms": med(wall_ms)}
    sync = synced()
    pos.fill_(p)
    kern = kernels(round_, n - 1)
    nbytes = r.model.weight_bytes_per_step() + r.model.kv_bytes_per_token() * (p + n // 2) * b
    out = {
        "variant": a.variant, "overlap": a.overlap, "decode_attention": a.decode_attention, "gemv": a.gemv,
        "pdl": not a.no_pdl,
        "split_swiglu": a.split_swiglu,
        "attn_block_t": cfg.attention_block_t, "attn_warps": cfg.attention_warps, "model": a.model, "batch": b,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "setup_s": round(t1 - t0, 1), "graph_build_s": round(build_s, 1),
        "copy_tb_per_s": r.copy_bw / 1e12, "bytes_per_step": nbytes,
        "tpot_ms": tpot, "step_gpu_ms": step_ms, "host_gap_ms": tpot - step_ms,
        "mbu_tpot": nbytes / (tpot / 1e3) / r.copy_bw, "mbu_step": nbytes / (step_ms / 1e3) / r.copy_bw,
        **sync, "tokens_head": gens[-1]["tokens"][0][:16],
        **kern,
        "gemv_only": gemv_only(r, b),
    }
    if a.repack:
        repack(r.model)
        r.graphs.clear()
        steps = r.decode_graphs(b, False)
        out["repacked"] = {"step_gpu_ms": replay_ms(round_, 10, before=lambda: pos.fill_(p)) / (n - 1),
                           "gemv_only": gemv_only(r, b)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
