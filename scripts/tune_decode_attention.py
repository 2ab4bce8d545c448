"""The decode-attention kernel alone on one GPU, for a sweep of keys per block and warps per block,
beside the SDPA path it replaces (RoPE + cache writes + SDPA, compiled as in the engine): median us
per call from CUDA events over a graph of 200 calls. One JSON line per configuration.

    python scripts/tune_decode_attention.py [--model llama3-8b] [--tp 1] [--batch 1] [--cache 256] [--pos 200]

Why: the kernel measured 6.4 us per call on an H100; a variant of its combine step 11.1 us on an
H200; the kernel is latency-bound, so its best shape is a measurement, not a count.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (overlap)

from step_anatomy import replay_ms  # scripts/ is on sys.path when run as a script

from overlap import kernels
from overlap.config import resolve_model
from overlap.model import attend


def per_call_us(fn, calls: int = 200) -> float:
    """Median us per call of `fn` over a CUDA graph of `calls` calls (warmed up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return replay_ms(g.replay, 10) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", type=int, default=256, help="cache length (prompt + output)")
    ap.add_argument("--pos", type=int, default=200, help="position of the new token")
    a = ap.parse_args()
    c = resolve_model(a.model)
    H, KV, D, B, T = c.num_heads // a.tp, c.num_kv_heads // a.tp, c.head_dim, a.batch, a.cache
    dev, dt = torch.device("cuda"), torch.bfloat16
    qkv = torch.randn(B, 1, (H + 2 * KV) * D, device=dev, dtype=dt)
    kc, vc = (torch.randn(B, KV, T, D, device=dev, dtype=dt) for _ in range(2))
    cos, sin = torch.randn(T, D, device=dev, dtype=dt), torch.randn(T, D, device=dev, dtype=dt)
    pos = torch.tensor([a.pos], device=dev)
    counters = torch.zeros(B * KV, dtype=torch.int32, device=dev)
    shape = {"model": a.model, "tp": a.tp, "batch": B, "cache": T, "pos": a.pos, "gpu": torch.cuda.get_device_name()}
    past = torch.arange(T, device=dev) > a.pos
    mask = torch.zeros(H // KV, T, device=dev, dtype=dt).masked_fill_(past, float("-inf"))
    sdpa = torch.compile(attend, fullgraph=True, dynamic=False)
    us = per_call_us(lambda: sdpa(qkv, kc, vc, cos[pos][None, :, None, :], sin[pos][None, :, None, :], pos, mask,
                                  H, KV, D))
    print(json.dumps({**shape, "path": "sdpa (compiled RoPE + cache writes + SDPA)", "us": round(us, 2)}))
    for block_t in (16, 32, 64, 128):
        for warps in (1, 2, 4, 8):
            tuning = kernels.Tuning(attention_block_t=block_t, attention_warps=warps)
            us = per_call_us(functools.partial(kernels.decode_attention, qkv, cos, sin, pos, kc, vc, H, KV, counters,
                                               tuning))
            print(json.dumps({**shape, "path": "triton", "block_t": block_t, "num_warps": warps, "us": round(us, 2),
                              "default": tuning[1:] == kernels.Tuning()[1:]}))


if __name__ == "__main__":
    main()
