"""The batch-1 GEMV kernel (overlap/gemv.py) for every weight shape of a model at the given TP sizes,
over a grid of rows per program x columns per step x warps, beside what the engine ran before
(Inductor's coordinate-descent-tuned multiply-reduce, as in model.compiled_blocks) and cuBLAS.
One JSON line per (shape, path, configuration), then one per shape with the best configuration, and
a last line `configs` in the form of gemv.CONFIGS.

    python scripts/tune_gemv.py [--model llama3-8b] [--tp 1 2] [--layers 32]

Each measurement calls the kernel on `--layers` distinct weights of the shape in one CUDA graph (what
a decode step does: a weight is read once and is gone from L2 when it comes round again) and divides
by the count: us per call, and the weight's bytes over that (TB/s; the KB input vector is not counted).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (overlap)

from tune_decode_attention import per_call_us  # scripts/ is on sys.path when run as a script

from overlap import gemv as G
from overlap.config import resolve_model
from overlap.model import compiled_blocks, matvec, swiglu_up

GRID = [(bn, bk, w) for bn, bk, w in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024), (1, 2, 4, 8))
        if 8 <= bn * bk // (32 * w) <= 128]  # elements per thread: one 16-byte load up to 128 accumulators


def shapes(c, tp: int) -> dict[str, tuple[int, int, bool]]:
    """name -> (output rows, columns, swiglu) of each weight product of one rank at TP size `tp`."""
    hd = c.head_dim
    return {"wqkv": ((c.num_heads + 2 * c.num_kv_heads) * hd // tp, c.hidden_size, False),
            "wo": (c.hidden_size, c.num_heads * hd // tp, False),
            "w13": (c.intermediate_size // tp, c.hidden_size, True),
            "w2": (c.hidden_size, c.intermediate_size // tp, False),
            "lm_head": (c.vocab_size // tp, c.hidden_size, False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--layers", type=int, default=32, help="distinct weights per measurement")
    a = ap.parse_args()
    c = resolve_model(a.model)
    inductor = compiled_blocks()
    best_all = {}
    for tp in a.tp:
        for name, (n, k, swiglu) in shapes(c, tp).items():
            best_all[f"({n}, {k}, {swiglu})"] = list(sweep(a, tp, name, n, k, swiglu, inductor))
            torch.cuda.empty_cache()
    print(json.dumps({"configs": best_all}))


def sweep(a, tp: int, name: str, n: int, k: int, swiglu: bool, inductor) -> tuple:
    """Every configuration of GRID for one weight shape, beside Inductor's and cuBLAS's products;
    one JSON line each and one for the best. Returns the best configuration."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = 2 * n if swiglu else n
    count = 4 if name == "lm_head" else a.layers  # one LM head: > 1 GB, never in L2 anyway
    ws = [torch.randn(rows, k, device=dev, dtype=dt) * k ** -0.5 for _ in range(count)]
    x = torch.randn(1, 1, k, device=dev, dtype=dt)
    nbytes = ws[0].numel() * ws[0].element_size()
    head = {"model": a.model, "tp": tp, "weight": name, "n": n, "k": k, "swiglu": swiglu,
            "gpu": torch.cuda.get_device_name()}

    def line(path: str, fn, **cfg) -> float:
        us = per_call_us(lambda: [fn(w) for w in ws], calls=1) / count
        print(json.dumps({**head, "path": path, **cfg, "us": round(us, 2),
                          "tb_per_s": round(nbytes / us / 1e6, 3)}), flush=True)
        return us
    if swiglu:
        def ref(w):
            return F.silu((x @ w[:n].t()).float()) * (x @ w[n:].t()).float()

        def kernel(w, cfg):
            return G.gemv_swiglu(x, w, n, cfg)
        line("inductor", lambda w: inductor.swiglu_up(x, w, n))
        line("cublas+pointwise", lambda w: swiglu_up(x, w, n))
    else:
        def ref(w):
            return (x @ w.t()).float()

        def kernel(w, cfg):
            return G.gemv(x, w, cfg)
        line("inductor", lambda w: inductor.matvec(x, w))
        line("cublas", lambda w: matvec(x, w))
    results = {}
    for cfg in GRID:
        if cfg[1] <= k:
            results[cfg] = line("triton", functools.partial(kernel, cfg=cfg), block_n=cfg[0], block_k=cfg[1],
                                num_warps=cfg[2])
    best = min(results, key=results.get)
    want = ref(ws[0])
    err = ((kernel(ws[0], best).float() - want).abs().max() / want.abs().max()).item()
    dflt = G.DEFAULT if G.DEFAULT in results else None
    print(json.dumps({**head, "best": best, "best_us": round(results[best], 2),
                      "best_tb_per_s": round(nbytes / results[best] / 1e6, 3), "rel_err": err,
                      "default_us": round(results[dflt], 2) if dflt else None}), flush=True)
    return best


if __name__ == "__main__":
    main()
