#!/usr/bin/env python3
"""Prefill of one Llama-3-8B decoder layer at TP=2 (one process per GPU), timed per way of running its
two all-reduces: blocking, pipelined over token chunks (NCCL with a normal or high-priority stream,
NCCL limited to fewer CTAs, or a copy-engine all-reduce through symmetric memory), and sequence
parallel (all-gather / reduce-scatter, plain NCCL or fused into the matmuls by torch's symmetric-memory
ops). Each variant has a comm-free twin (the same schedule with the collectives removed), so the
communication a variant still exposes is measured, not assumed. It decides which overlap design can
reach issue #19's prefill target (notes/prefill-overlap.md explains the variants and the predictions).

    python scripts/bench_prefill_overlap.py                         # 2 GPUs: T = 1024 4096 8192 tokens
    python scripts/bench_prefill_overlap.py --device cpu --tokens 64    # CPU smoke: gloo, tiny shapes

Each rank runs `--layers` distinct layers (so weights stream from HBM as in the model) captured in one
CUDA graph per variant; the variants are timed round-robin (CUDA events, `--rounds` rounds) after a
barrier, so drift hits all alike; us per layer, median. Before timing, each variant's output is
compared with `none`'s on the same inputs (and `none` with a TP=1 computation on rank 0). The probe
times a w2-shaped GEMM and a chunk's all-reduce alone and concurrently: it says whether the collective
slows the GEMM (SM contention), which decides whether a pipeline can hide communication at all.
Output: progress lines ('#'), one JSON line per (variant, T) and per probe, then a table.
On CPU (gloo, fp32) the CUDA-only variants are skipped with their reason; gloo's all-gather and
reduce-scatter are emulated (all_gather + cat, all_reduce + slice), which is said in the output.
"""
from __future__ import annotations

import os
import sys

# Set before torch (and with it NCCL and NVSHMEM) is imported below: the imports follow on purpose.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in MULTICAST_OFF.items():
    if os.environ.setdefault(_k, _v) != _v:
        print(f"error: {_k}={os.environ[_k]} but NVLink multicast must stay off ({_k}={_v})", file=sys.stderr)
        sys.exit(2)

import argparse
import faulthandler
import json
import math
import multiprocessing as mp
import re
import socket
import statistics
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `overlap` from the checkout


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    eps: float = 1e-5
    rope_theta: float = 500000.0


SHAPES = {"llama3-8b": Shape(4096, 32, 8, 128, 14336), "tiny": Shape(256, 8, 4, 32, 512)}
# Order matters on the GPU: the variants built from plain NCCL come first, those using symmetric
# memory (a new code path for this project) last, so a failure there loses nothing measured before.
SAFE = ["none", "cf", "pipe2", "pipe2_cf", "pipe2_hp", "pipe4", "pipe4_cf", "pipe4_hp", "sp_nccl", "sp_cf"]
SYMM = ["none_ce", "pipe2_ce", "pipe4_ce", "sp_async"]
DESCRIBE = {
    "none": "blocking NCCL all-reduce after each row-parallel GEMM, on the compute stream (the engine's none)",
    "cf": "none without the all-reduces: the compute floor",
    "pipeK": "K token chunks; chunk i's NCCL all-reduce on a comm stream while chunk i+1 computes",
    "pipeK_cf": "the pipeK schedule (chunks, streams, events) without the all-reduces",
    "pipeK_hp": "pipeK with the comm stream at the highest priority (graphs keep node priorities)",
    "pipe2_ctasN": "pipe2 on an NCCL communicator created with config.max_ctas = N",
    "none_ce": "blocking all-reduce through symmetric memory, data moved by copy engines (no SM copies)",
    "pipeK_ce": "pipeK with the copy-engine all-reduce on the comm stream",
    "sp_nccl": "sequence parallel: residual sharded by tokens, NCCL all-gather before wqkv/w13, "
               "reduce-scatter after wo/w2",
    "sp_async": "sequence parallel with torch.ops.symm_mem.fused_all_gather_matmul / "
                "fused_matmul_reduce_scatter",
    "sp_cf": "the sequence-parallel schedule without communication (local copy into the gather buffer, "
             "row slice for the scatter)",
}


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world", type=int, default=2, help="TP size = processes (default 2)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="tokens per prefill T (default 1024 4096 8192 on cuda, 64 on cpu)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence: T = batch x seq-len (default min(1024, T))")
    p.add_argument("--model", choices=sorted(SHAPES), default=None,
                   help="layer shapes (default llama3-8b on cuda, tiny on cpu)")
    p.add_argument("--layers", type=int, default=None, help="distinct layers per timed graph (default 4 cuda, 2 cpu)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 15 cuda, 3 cpu)")
    p.add_argument("--min-ms", type=float, default=10.0, help="device time per timed measurement (graph replays)")
    p.add_argument("--variants", default="all", help="comma list of variants, or 'all' (see --list)")
    p.add_argument("--ctas", default="4,8", help="max_ctas values of the extra NCCL communicators ('' for none)")
    p.add_argument("--no-probe", action="store_true", help="skip the GEMM || all-reduce interference probe")
    p.add_argument("--no-ref", action="store_true", help="skip the TP=1 reference check of `none`")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=420.0,
                   help="whole-run limit: a hung rank dumps its stack and every rank is stopped")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.tokens = a.tokens or ([64] if cpu else [1024, 4096, 8192])
    a.model = a.model or ("tiny" if cpu else "llama3-8b")
    a.layers = a.layers if a.layers is not None else (2 if cpu else 4)
    a.rounds = a.rounds if a.rounds is not None else (3 if cpu else 15)
    try:
        a.ctas = [int(c) for c in a.ctas.split(",") if c.strip()]
    except ValueError:
        p.error(f"--ctas must be a comma list of integers, got {a.ctas!r}")
    names = all_variant_names(a.ctas)
    if a.list:
        return a
    a.variants = names if a.variants == "all" else [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in names]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(names)}")
    if "none" not in a.variants or "cf" not in a.variants:
        p.error("--variants must include none and cf: every share is relative to them")
    s = SHAPES[a.model]
    if not 2 <= a.world <= 8:
        p.error(f"--world must be 2..8, got {a.world}")
    if s.heads % a.world or s.kv_heads % a.world or s.inter % a.world:
        p.error(f"{a.model}'s heads/KV heads/intermediate size do not split over {a.world} ranks")
    for t in a.tokens:
        seq = a.seq_len if a.seq_len is not None else min(1024, t)
        if t < 1 or seq < 1 or t % seq:
            p.error(f"--tokens {t} is not a whole number of sequences of {seq} tokens")
        if t % a.world:
            p.error(f"--tokens {t} does not split over {a.world} ranks (sequence parallel)")
    if a.layers < 1 or a.rounds < 1 or a.min_ms <= 0 or a.timeout_s <= 0:
        p.error("--layers, --rounds, --min-ms and --timeout-s must be positive")
    if any(c < 1 or c > 64 for c in a.ctas):
        p.error(f"--ctas values must be 1..64, got {a.ctas}")
    if not cpu:
        n = torch.cuda.device_count()
        if n < a.world:
            p.error(f"--world {a.world} needs {a.world} GPUs; {n} visible")
    return a


def all_variant_names(ctas: list[int]) -> list[str]:
    safe = list(SAFE)
    safe[safe.index("pipe2_hp") + 1:safe.index("pipe2_hp") + 1] = [f"pipe2_ctas{c}" for c in ctas]
    return safe + SYMM


# ------------------------------------------------------------------------------------------------------
# The layer: weights, attention, the two sublayers
# ------------------------------------------------------------------------------------------------------
class LayerW:
    """One layer's weights on one rank (HF layout [out, in]) and its K/V buffers [B, kv heads, S, hd]."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_layers(s: Shape, n_layers: int, rank: int, world: int, batch: int, seq: int, dtype, device,
                seed: int, full: bool):
    """This rank's shards of `n_layers` random layers (the same full-size draw on every rank, then
    sliced, so TP=`world` computes what one GPU would); with `full`, also the unsharded layers."""
    hd, H, inter = s.head_dim, s.hidden, s.inter
    nh, nkv, il = s.heads // world, s.kv_heads // world, s.inter // world
    shards, fulls = [], []

    def draw(name, shape, li, norm=False):
        g = torch.Generator(device=device).manual_seed(seed * 1000003 + li * 101 + hash_name(name))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        return (1.0 + 0.1 * t if norm else t.mul_(0.02)).to(dtype)

    for li in range(n_layers):
        wq, wk = draw("q", (s.heads * hd, H), li), draw("k", (s.kv_heads * hd, H), li)
        wv = draw("v", (s.kv_heads * hd, H), li)
        wo, gate = draw("o", (H, s.heads * hd), li), draw("g", (inter, H), li)
        up, down = draw("u", (inter, H), li), draw("d", (H, inter), li)
        an, fn = draw("an", (H,), li, norm=True), draw("fn", (H,), li, norm=True)

        def rows(t, n):
            return t[rank * n:(rank + 1) * n]

        kv_shape = (batch, nkv, seq, hd)
        shards.append(LayerW(
            attn_norm=an, ffn_norm=fn, nh=nh, nkv=nkv, hd=hd, inter=il,
            wqkv=torch.cat([rows(wq, nh * hd), rows(wk, nkv * hd), rows(wv, nkv * hd)]).contiguous(),
            wo=wo[:, rank * nh * hd:(rank + 1) * nh * hd].contiguous(),
            w13=torch.cat([rows(gate, il), rows(up, il)]).contiguous(),
            w2=down[:, rank * il:(rank + 1) * il].contiguous(),
            kbuf=torch.zeros(kv_shape, dtype=dtype, device=device),
            vbuf=torch.zeros(kv_shape, dtype=dtype, device=device)))
        if full:
            fkv = (batch, s.kv_heads, seq, hd)
            fulls.append(LayerW(attn_norm=an, ffn_norm=fn, nh=s.heads, nkv=s.kv_heads, hd=hd, inter=inter,
                                wqkv=torch.cat([wq, wk, wv]), wo=wo, w13=torch.cat([gate, up]), w2=down,
                                kbuf=torch.zeros(fkv, dtype=dtype, device=device),
                                vbuf=torch.zeros(fkv, dtype=dtype, device=device)))
    return shards, fulls


def hash_name(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def rope_tables(s: Shape, seq: int, dtype, device):
    inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float64, device=device) / s.head_dim))
    ang = torch.outer(torch.arange(seq, dtype=torch.float64, device=device), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def attend(qkv, L: LayerW, rope, chunk):
    """RoPE, K/V written into the layer's buffers at the chunk's positions, causal attention of the
    chunk's queries over positions [0, s1): [rows, heads * hd]. A later sequence chunk (s0 > 0) attends
    with the lower-right causal mask (its queries sit at the end of the keys), as ISO-style chunked
    prefill must. K/V heads are repeated to the query heads (GQA) the same way in every variant."""
    from torch.nn.attention.bias import causal_lower_right

    b0, b1, s0, s1 = chunk
    nb, s = b1 - b0, s1 - s0
    nh, nkv, hd = L.nh, L.nkv, L.hd
    t = qkv.view(nb, s, nh + 2 * nkv, hd)
    cos, sin = rope[0][s0:s1].view(1, s, 1, hd), rope[1][s0:s1].view(1, s, 1, hd)
    qk = t[:, :, :nh + nkv]
    qk = qk * cos + rotate_half(qk) * sin
    L.kbuf[b0:b1, :, s0:s1] = qk[:, :, nh:].transpose(1, 2)
    L.vbuf[b0:b1, :, s0:s1] = t[:, :, nh + nkv:].transpose(1, 2)
    g = nh // nkv
    k = L.kbuf[b0:b1, :, :s1].repeat_interleave(g, dim=1)
    v = L.vbuf[b0:b1, :, :s1].repeat_interleave(g, dim=1)
    q = qk[:, :, :nh].transpose(1, 2)
    if s0 == 0:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s, s1))
    return y.transpose(1, 2).reshape(nb * s, nh * hd)


def mm(a, w, out=None):
    """a @ w.T for a weight in HF layout; into `out` (a symmetric-memory slot) when given."""
    return torch.mm(a, w.t()) if out is None else torch.mm(a, w.t(), out=out)


def norm(x, d, w, eps):
    if d is not None:
        x = x + d
    return x, F.rms_norm(x, (x.shape[-1],), w, eps)


def attn_sub(L, x, d, chunk, rope, eps, out=None):
    x, h = norm(x, d, L.attn_norm, eps)
    return x, mm(attend(mm(h, L.wqkv), L, rope, chunk), L.wo, out)


def swiglu(gu, inter):
    g, u = gu.split(inter, dim=-1)
    return F.silu(g) * u


def mlp_sub(L, x, d, eps, out=None):
    x, h = norm(x, d, L.ffn_norm, eps)
    return x, mm(swiglu(mm(h, L.w13), L.inter), L.w2, out)


# ------------------------------------------------------------------------------------------------------
# All-reduces
# ------------------------------------------------------------------------------------------------------
class ProcessGroupAllReduce:
    """dist.all_reduce in place on the current stream (NCCL on GPU, gloo on CPU), on `group`."""

    def __init__(self, group=None):
        self.group = group

    def dest(self, slot: int, n: int):
        return None

    def __call__(self, part, slot: int):
        dist.all_reduce(part, group=self.group)
        return part


from llm_bench.options import OneLineParser  # noqa: E402
from overlap.ce_allreduce import CopyEngineAllReduce  # noqa: E402 - the engine's own, after the path


class NoAllReduce:
    """The comm-free twin: the partial sum stands in for the reduced one (wrong numbers, same compute)."""

    def dest(self, slot: int, n: int):
        return None

    def __call__(self, part, slot: int):
        return part


# ------------------------------------------------------------------------------------------------------
# Sequence-parallel collectives: gather the normed shard before a column-parallel GEMM, scatter the
# row-parallel GEMM's partial sums
# ------------------------------------------------------------------------------------------------------
class SeqParallel:
    def __init__(self, kind: str, rank: int, world: int, tokens: int, hidden: int, dtype, device):
        self.kind, self.rank, self.world, self.T = kind, rank, world, tokens
        self.n = tokens // world
        if kind == "symm":
            self.group_name = dist.group.WORLD.group_name
        if kind == "free":  # the gather buffer of the comm-free twin: zeros outside this rank's rows
            self.gbuf = torch.zeros((tokens, hidden), dtype=dtype, device=device)

    def ag_mm(self, h, w):
        """all_gather(h along tokens) @ w.T: [T, out]."""
        if self.kind == "symm":
            _, outs = torch.ops.symm_mem.fused_all_gather_matmul(h, [w.t()], 0, self.group_name, return_A=False)
            return outs[0]
        if self.kind == "free":
            self.gbuf[self.rank * self.n:(self.rank + 1) * self.n].copy_(h)
            return mm(self.gbuf, w)
        if self.kind == "nccl":
            full = h.new_empty((self.T, h.shape[1]))
            dist.all_gather_into_tensor(full, h)
            return mm(full, w)
        # gloo: emulated by all_gather into a list + cat (correct values, not the NCCL op)
        parts = [torch.empty_like(h) for _ in range(self.world)]
        dist.all_gather(parts, h.contiguous())
        return mm(torch.cat(parts), w)

    def mm_rs(self, a, w):
        """reduce_scatter(a @ w.T along tokens): this rank's rows of the summed product, [T/world, out]."""
        if self.kind == "symm":
            return torch.ops.symm_mem.fused_matmul_reduce_scatter(a, w.t(), "sum", 0, self.group_name)
        p = mm(a, w)
        rows = slice(self.rank * self.n, (self.rank + 1) * self.n)
        if self.kind == "free":
            return p[rows]
        if self.kind == "nccl":
            out = p.new_empty((self.n, p.shape[1]))
            dist.reduce_scatter_tensor(out, p)
            return out
        dist.all_reduce(p)  # gloo: emulated by all-reduce + this rank's rows
        return p[rows]


# ------------------------------------------------------------------------------------------------------
# Schedules: each runs `layers` on the static input `x` and writes the residual stream into `out`
# ------------------------------------------------------------------------------------------------------
def run_serial(layers, x, out, ar, rope, eps, batch, seq):
    chunk = (0, batch, 0, seq)
    d = None
    for L in layers:
        x, p = attn_sub(L, x, d, chunk, rope, eps, ar.dest(0, x.shape[0]))
        d = ar(p, 0)
        x, p = mlp_sub(L, x, d, eps, ar.dest(0, x.shape[0]))
        d = ar(p, 0)
    torch.add(x, d, out=out)


def pipeline_chunks(batch: int, seq: int, k: int):
    """(b0, b1, s0, s1) per chunk and its token rows: micro-batches of sequences when the batch splits
    into k, else (batch 1) k sequence chunks, as overlap/streams.prefill_chunks does."""
    if batch % k == 0:
        n = batch // k
        return [((i * n, (i + 1) * n, 0, seq), slice(i * n * seq, (i + 1) * n * seq)) for i in range(k)]
    if batch == 1 and seq % k == 0:
        n = seq // k
        return [((0, 1, i * n, (i + 1) * n), slice(i * n, (i + 1) * n)) for i in range(k)]
    raise ValueError(f"batch {batch} x {seq} tokens splits into neither {k} micro-batches nor {k} sequence chunks")


def run_pipeline(layers, x, out, ar, rope, eps, chunks, comm_stream):
    """As TPLlama.hidden with several chunks: per sublayer, chunk i computes, then its all-reduce goes
    to the comm stream (after an event), and chunk i's next sublayer waits for it. On CPU (no stream)
    the all-reduce runs in line."""
    cuda = comm_stream is not None
    cur = torch.cuda.current_stream() if cuda else None
    xs = [x[rows] for _, rows in chunks]
    ds: list = [None] * len(chunks)
    pending: list = [None] * len(chunks)
    keep = []  # tensors used on both streams stay alive until the join
    for L in layers:
        for sub in (0, 1):
            for ci, (chunk, _) in enumerate(chunks):
                if pending[ci] is not None:
                    cur.wait_event(pending[ci])
                dst = ar.dest(ci, xs[ci].shape[0])
                if sub == 0:
                    xs[ci], p = attn_sub(L, xs[ci], ds[ci], chunk, rope, eps, dst)
                else:
                    xs[ci], p = mlp_sub(L, xs[ci], ds[ci], eps, dst)
                if not cuda:
                    ds[ci] = ar(p, ci)
                    continue
                ready = torch.cuda.Event()
                ready.record(cur)
                with torch.cuda.stream(comm_stream):
                    comm_stream.wait_event(ready)
                    ds[ci] = ar(p, ci)
                    pending[ci] = torch.cuda.Event()
                    pending[ci].record(comm_stream)
                keep.append((p, ds[ci]))
    if cuda:
        for ev in pending:
            cur.wait_event(ev)
        cur.wait_stream(comm_stream)
    for (_, rows), xi, di in zip(chunks, xs, ds):
        torch.add(xi, di, out=out[rows])
    keep.clear()


def run_seq_parallel(layers, x, out, sp: SeqParallel, rope, eps, batch, seq):
    """Residual stream sharded by tokens (rank r holds rows r*T/W..): norm on the shard, all-gather
    before wqkv and w13, attention over all T tokens, reduce-scatter after wo and w2."""
    chunk = (0, batch, 0, seq)
    xs = x[sp.rank * sp.n:(sp.rank + 1) * sp.n]
    d = None
    for L in layers:
        xs, h = norm(xs, d, L.attn_norm, eps)
        d = sp.mm_rs(attend(sp.ag_mm(h, L.wqkv), L, rope, chunk), L.wo)
        xs, h = norm(xs, d, L.ffn_norm, eps)
        d = sp.mm_rs(swiglu(sp.ag_mm(h, L.w13), L.inter), L.w2)
    torch.add(xs, d, out=out)


# ------------------------------------------------------------------------------------------------------
# One rank
# ------------------------------------------------------------------------------------------------------
class Rank:
    def __init__(self, rank: int, world: int, args):
        self.rank, self.world, self.a = rank, world, args
        self.cuda = args.device == "cuda"
        self.device = torch.device("cuda", rank) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.shape = SHAPES[args.model]
        self.groups = {}      # max_ctas -> NCCL group
        self.streams = {}     # "normal" / "high" comm streams
        self.ce = None        # CopyEngineAllReduce, shared by the *_ce variants and the probe
        self.symm_error = None
        self.ctas_error = None
        self.json_out = args.json_out if rank == 0 else None

    # -- output (rank 0) --------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"# {msg}", flush=True)

    def emit(self, rec: dict) -> None:
        if self.rank != 0:
            return
        line = json.dumps(rec)
        print(line, flush=True)
        if self.json_out:
            with open(self.json_out, "a") as f:
                f.write(line + "\n")

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, variants: list[str]) -> None:
        a = self.a
        if self.cuda:
            torch.cuda.set_device(self.device)
            self.say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}, "
                     f"{torch.cuda.get_device_name(self.device)} x {self.world}; env "
                     + " ".join(f"{k}={os.environ[k]}" for k in MULTICAST_OFF))
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
            self.say(f"torch {torch.__version__}, CPU, gloo, fp32, {self.world} ranks, shapes '{a.model}'")
        if self.cuda:
            self.streams = {"normal": torch.cuda.Stream(self.device),
                            "high": torch.cuda.Stream(self.device, priority=-100)}
            lo, hi = self.streams["high"].priority_range()
            self.say(f"stream priorities: normal {self.streams['normal'].priority}, high "
                     f"{self.streams['high'].priority} (range {lo}..{hi})")
            t = torch.ones(1, device=self.device)
            dist.all_reduce(t)  # communicators come up outside any graph capture
            try:
                for c in a.ctas:
                    if f"pipe2_ctas{c}" not in variants and a.no_probe:
                        continue
                    opts = dist.ProcessGroupNCCL.Options()
                    opts.config.max_ctas = c
                    self.groups[c] = dist.new_group(ranks=list(range(self.world)), backend="nccl", pg_options=opts)
                    dist.all_reduce(t, group=self.groups[c])
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - the ctas variants are skipped with this reason
                self.ctas_error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            if not self.agree(self.ctas_error is None):
                self.ctas_error = self.ctas_error or "failed on another rank"
                self.groups = {}
                self.say(f"NCCL communicators with max_ctas unavailable: {self.ctas_error}")
            self._setup_symm(variants)
            if not self.agree(self.symm_error is None) and self.symm_error is None:
                self.symm_error = "failed on another rank"

    def _setup_symm(self, variants: list[str]) -> None:
        """Symmetric memory for the *_ce variants and sp_async: refused where multicast would be used;
        buffers sized for the largest T now (the fused ops cannot grow their workspace inside a capture)."""
        want_ce = any(v.endswith("_ce") for v in variants) or not self.a.no_probe
        want_sp = "sp_async" in variants
        if not (want_ce or want_sp):
            return
        try:
            import torch.distributed._symmetric_memory as symm_mem
            from torch._C._autograd import DeviceType
            from torch._C._distributed_c10d import _SymmetricMemory

            mc = _SymmetricMemory.has_multicast_support(DeviceType.CUDA, self.device.index)
            try:
                backend = symm_mem.get_backend(self.device)
            except Exception as e:  # noqa: BLE001 - informational only
                backend = f"unknown ({type(e).__name__})"
            self.say(f"symmetric memory: backend {backend}, multicast support {mc}")
            if mc:
                raise RuntimeError("symmetric memory reports multicast support although "
                                   "TORCH_SYMM_MEM_DISABLE_MULTICAST=1: refusing (multimem paths must not run)")
            tmax, H, es = max(self.a.tokens), self.shape.hidden, self.dtype.itemsize
            group_name = dist.group.WORLD.group_name
            if want_sp:
                # fused_matmul_reduce_scatter: 2 x (T/W x H) for its double buffer; all-gather: T/W x H
                symm_mem.get_symm_mem_workspace(group_name, min_size=2 * (tmax // self.world) * H * es)
            if want_ce:
                self.ce = CopyEngineAllReduce.symmetric(group_name, self.rank, self.world, slots=4, max_rows=tmax,
                                                        hidden=H, dtype=self.dtype, device=self.device)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - the reason is printed and the variants are skipped
            self.symm_error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self.say(f"symmetric memory unavailable: {self.symm_error}")

    # -- variants ---------------------------------------------------------------------------------
    def skip_reason(self, v: str, batch: int, seq: int) -> str | None:
        cuda_only = v.endswith(("_hp", "_ce")) or "_ctas" in v or v == "sp_async"
        if cuda_only and not self.cuda:
            what = ("stream priority" if v.endswith("_hp") else "an NCCL communicator option" if "_ctas" in v
                    else "symmetric memory (CUDA)")
            return f"needs {what}; CPU runs gloo without streams"
        if (v.endswith("_ce") or v == "sp_async") and self.symm_error:
            return f"symmetric memory unavailable: {self.symm_error}"
        if "_ctas" in v and self.ctas_error:
            return f"NCCL communicator with max_ctas unavailable: {self.ctas_error}"
        if v.startswith("pipe"):
            try:
                pipeline_chunks(batch, seq, int(v[4]))
            except ValueError as e:
                return str(e)
        return None

    def build(self, v: str, layers, x, rope, batch: int, seq: int):
        """(fn, out): fn() runs the variant's schedule over `layers` from the static input `x` into the
        static output `out` (full rows, or this rank's token shard for sequence parallel)."""
        T, eps = x.shape[0], self.shape.eps
        if v.startswith("sp_"):
            kind = {"sp_async": "symm", "sp_cf": "free", "sp_nccl": "nccl" if self.cuda else "gloo"}[v]
            sp = SeqParallel(kind, self.rank, self.world, T, self.shape.hidden, self.dtype, self.device)
            out = torch.empty((T // self.world, self.shape.hidden), dtype=self.dtype, device=self.device)
            return (lambda: run_seq_parallel(layers, x, out, sp, rope, eps, batch, seq)), out
        out = torch.empty_like(x)
        if v.endswith("_cf") or v == "cf":
            ar = NoAllReduce()
        elif v.endswith("_ce"):
            ar = self.ce
        elif "_ctas" in v:
            ar = ProcessGroupAllReduce(self.groups[int(v.split("_ctas")[1])])
        else:
            ar = ProcessGroupAllReduce()
        if v in ("none", "cf", "none_ce"):
            return (lambda: run_serial(layers, x, out, ar, rope, eps, batch, seq)), out
        chunks = pipeline_chunks(batch, seq, int(v[4]))
        stream = self.streams.get("high" if v.endswith("_hp") else "normal")
        return (lambda: run_pipeline(layers, x, out, ar, rope, eps, chunks, stream)), out

    def agree(self, ok: bool) -> bool:
        """Whether every rank succeeded (so all ranks keep or drop a variant together)."""
        t = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_rows(self, shard):
        parts = [torch.empty_like(shard) for _ in range(self.world)]
        dist.all_gather(parts, shard.contiguous())
        return torch.cat(parts)

    # -- one token count --------------------------------------------------------------------------
    def run_tokens(self, T: int, variants: list[str]) -> list[dict]:
        a, s = self.a, self.shape
        seq = a.seq_len if a.seq_len is not None else min(1024, T)
        batch = T // seq
        self.say(f"T={T}: batch {batch} x {seq} tokens, {a.layers} layers per graph")
        ref_on = not a.no_ref
        layers, full = make_layers(s, a.layers, self.rank, self.world, batch, seq, self.dtype, self.device,
                                   a.seed, full=ref_on and self.rank == 0)
        g = torch.Generator(device=self.device).manual_seed(a.seed + T)
        x = torch.randn((T, s.hidden), generator=g, device=self.device, dtype=torch.float32).to(self.dtype)
        rope = rope_tables(s, seq, self.dtype, self.device)
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        results: dict = {}

        # 1. build and check every variant eagerly (the first warm-up), all ranks agreeing to keep it
        fns, checks = {}, {}
        for v in variants:
            why = self.skip_reason(v, batch, seq)
            if why:
                results[v] = {"skipped": why}
                continue
            err = None
            try:
                fn, out = self.build(v, layers, x, rope, batch, seq)
                fn()
                if self.cuda:
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported; every rank drops the variant together
                err = f"{type(e).__name__}: {e}"
                print(f"[rank {self.rank}] {v} failed eagerly:", file=sys.stderr)
                traceback.print_exc()
            if not self.agree(err is None):
                results[v] = {"skipped": f"failed eagerly: {err or 'on another rank'}"}
                self.say(f"T={T} {v}: FAILED eagerly: {err or 'on another rank'}")
                continue
            fns[v] = fn
            if v.endswith("_cf") or v == "cf":
                checks[v] = None  # wrong numbers by design
                continue
            full_out = self.gather_rows(out) if v.startswith("sp_") else out
            checks[v] = full_out.float().clone()
        if "none" not in checks or "cf" not in fns:
            raise RuntimeError(f"T={T}: none or cf did not run ({results.get('none')}, {results.get('cf')}): "
                               "every comparison is against them")
        ref = checks["none"]
        for v, o in checks.items():
            if o is None:
                results[v] = {"rel_err_vs_none": None}
                continue
            e = ((o - ref).abs().max() / ref.abs().max()).item()
            ok = e <= tol  # False for NaN too
            results[v] = {"rel_err_vs_none": e, "correct": ok}
            self.say(f"T={T} check {v:12s} vs none: max rel err {e:.2e} ({'ok' if ok else 'MISMATCH'}, tol {tol:g})")
        if ref_on and self.rank == 0:
            out1 = torch.empty_like(x)
            run_serial(full, x, out1, NoAllReduce(), rope, s.eps, batch, seq)
            e = ((ref - out1.float()).abs().max() / out1.float().abs().max()).item()
            results["none"]["rel_err_vs_tp1"] = e
            self.say(f"T={T} check none vs TP=1 on one rank: max rel err {e:.2e} ({'ok' if e <= tol else 'MISMATCH'})")
            del full, out1
        del checks

        # 2. CUDA graphs (second warm-up eager, then capture), in order; failures drop the variant
        runs = dict(fns)
        if self.cuda:
            runs = {}
            for v, fn in fns.items():
                t0 = time.perf_counter()
                err = None
                try:
                    runs[v] = capture(fn, self.device)
                except Exception as e:  # noqa: BLE001
                    err = f"{type(e).__name__}: {e}"
                    print(f"[rank {self.rank}] {v}: capture failed:", file=sys.stderr)
                    traceback.print_exc()
                if not self.agree(err is None):
                    runs.pop(v, None)
                    results[v]["skipped"] = f"CUDA graph capture failed: {err or 'on another rank'}"
                    self.say(f"T={T} {v}: capture FAILED: {err or 'on another rank'}")
                else:
                    self.say(f"T={T} {v}: captured in {time.perf_counter() - t0:.2f} s")
        del fns

        # 3. timing: round-robin over the variants, replays per measurement sized by `none`
        if "none" not in runs or "cf" not in runs:
            raise RuntimeError(f"T={T}: none or cf could not be captured ({results['none']}, {results['cf']})")
        est = self.time_once(runs["none"], 1)
        reps = max(1, math.ceil(a.min_ms / max(est, 1e-3)))
        self.say(f"T={T}: none ~{est:.2f} ms per replay; {reps} replays x {a.rounds} rounds per variant")
        samples = {v: [] for v in runs}
        order = list(runs)
        for rd in range(a.rounds):
            for v in order[rd % len(order):] + order[:rd % len(order)]:
                samples[v].append(self.time_once(runs[v], reps) * 1e3 / (reps * a.layers))
        mine = {v: statistics.median(xs) for v, xs in samples.items()}
        spread = {v: (float(torch.tensor(xs).quantile(0.25)), float(torch.tensor(xs).quantile(0.75)))
                  for v, xs in samples.items()}
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        for v in variants:
            r = results.setdefault(v, {})
            rec = {"kind": "variant", "variant": v, "tokens": T, "batch": batch, "seq_len": seq,
                   "layers": a.layers, "model": a.model, "world": self.world, "device": a.device,
                   "dtype": str(self.dtype).replace("torch.", "")}
            if v in mine:
                rec.update(us_per_layer=mine[v], us_p25=spread[v][0], us_p75=spread[v][1],
                           us_per_layer_ranks=[e[v] for e in every], rounds=a.rounds, replays=reps)
            rec.update(r)
            results[v] = rec
            self.emit(rec)
        del runs
        if not self.a.no_probe and self.cuda:
            self.probe(T, layers)
        del layers, x
        if self.cuda:
            torch.cuda.empty_cache()
        return [results[v] for v in variants]

    def time_once(self, run, reps: int) -> float:
        """ms for `reps` back-to-back runs, started together on every rank (barrier first)."""
        if self.cuda:
            dist.barrier(device_ids=[self.device.index])
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps):
                run()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - t0) * 1e3

    # -- the interference probe -------------------------------------------------------------------
    def probe(self, T: int, layers) -> None:
        """A w2-shaped GEMM of one pipeline chunk (T/2 rows x inter/W -> hidden) and that chunk's
        all-reduce (T/2 x hidden), alone and launched together on two streams, per all-reduce kind.
        overlap_eff = (gemm + ar - together) / min(gemm, ar): 1 = fully hidden, 0 = serial."""
        n, H, reps = T // 2, self.shape.hidden, 8
        w = layers[0].w2
        g = torch.Generator(device=self.device).manual_seed(7)
        a_in = torch.randn((n, w.shape[1]), generator=g, device=self.device, dtype=torch.float32).to(self.dtype)
        g_out = torch.empty((n, H), dtype=self.dtype, device=self.device)
        buf = torch.zeros((n, H), dtype=self.dtype, device=self.device)  # sums of zeros stay zeros
        kinds = {"nccl": (ProcessGroupAllReduce(), "normal"), "nccl_hp": (ProcessGroupAllReduce(), "high")}
        for c, grp in self.groups.items():
            kinds[f"nccl_ctas{c}"] = (ProcessGroupAllReduce(grp), "normal")
        if self.ce is not None and self.symm_error is None:
            kinds["ce"], kinds["ce_hp"] = (self.ce, "normal"), (self.ce, "high")
        cur_gemm = capture(lambda: [mm(a_in, w, g_out) for _ in range(reps)], self.device)

        def ar_target(ar):
            d = ar.dest(0, n)
            if d is not None:
                d.zero_()
            return d if d is not None else buf

        def both(ar, stream, tgt):
            def fn():
                cur = torch.cuda.current_stream()
                for _ in range(reps):
                    stream.wait_stream(cur)
                    with torch.cuda.stream(stream):
                        ar(tgt, 0)
                    mm(a_in, w, g_out)
                    cur.wait_stream(stream)
            return fn

        t_gemm = statistics.median(self.time_once(cur_gemm, 1) for _ in range(self.a.rounds)) * 1e3 / reps
        for name, (ar, prio) in kinds.items():
            err = None
            try:
                tgt = ar_target(ar)
                g_ar = capture(lambda ar=ar, tgt=tgt: [ar(tgt, 0) for _ in range(reps)], self.device)
                g_both = capture(both(ar, self.streams[prio], tgt), self.device)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
                print(f"[rank {self.rank}] probe {name}: capture failed:", file=sys.stderr)
                traceback.print_exc()
            if not self.agree(err is None):
                self.emit({"kind": "probe", "tokens": T, "allreduce": name,
                           "skipped": f"capture failed: {err or 'on another rank'}"})
                continue
            t_ar = statistics.median(self.time_once(g_ar, 1) for _ in range(self.a.rounds)) * 1e3 / reps
            t_both = statistics.median(self.time_once(g_both, 1) for _ in range(self.a.rounds)) * 1e3 / reps
            self.emit({"kind": "probe", "tokens": T, "rows": n, "allreduce": name, "gemm_us": t_gemm,
                       "ar_us": t_ar, "together_us": t_both,
                       "overlap_eff": (t_gemm + t_ar - t_both) / min(t_gemm, t_ar),
                       "excess_over_longer_us": t_both - max(t_gemm, t_ar)})


def capture(fn, device):
    """fn's CUDA graph replay (one more eager run on a side stream first, as capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize(device)
    return g.replay


# ------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------
def own_cf(v: str) -> str:
    if v.startswith("sp_"):
        return "sp_cf"
    if v.startswith("pipe"):
        return v[:5] + "_cf"
    return "cf"


def table(all_results: dict) -> list[str]:
    """Per T and variant: us per layer, change vs none, exposed comm = t - t(cf) (the brief's definition)
    and its hidden share 1 - exposed/exposed(none); and against the variant's own comm-free twin
    (schedule cost split out): exposed_own = t - t(own cf), hidden_own = 1 - exposed_own/exposed(none).
    A share outside [0, 1] is printed with '!': it is no share (noise, or slower for reasons other
    than communication)."""
    head = ["T", "variant", "us/layer", "vs none", "exposed", "hidden", "own cf", "sched cost",
            "exposed own", "hidden own", "rel err"]
    rows, skipped = [head], []
    for T, res in all_results.items():
        t = {r["variant"]: r["us_per_layer"] for r in res if "us_per_layer" in r}
        if "none" not in t or "cf" not in t:
            continue
        c_none = t["none"] - t["cf"]

        def share(x, c_none=c_none):
            if c_none <= 0:
                return "n/a"
            h = 1 - x / c_none
            return f"{h:.0%}" + ("" if 0 <= h <= 1 else " !")
        for r in res:
            v = r["variant"]
            if v not in t:
                continue
            cells = [str(T), v, f"{t[v]:.1f}", f"{t[v] / t['none'] - 1:+.1%}"]
            if v == "cf" or v.endswith("_cf"):  # a comm-free twin: its cost over the floor is the schedule's
                rows.append(cells + ["", "", "", f"{t[v] - t['cf']:+.1f}" if v != "cf" else "", "", "", ""])
                continue
            cells += [f"{t[v] - t['cf']:.1f}", share(t[v] - t["cf"])]
            ocf = own_cf(v)
            if ocf in t and ocf != "cf":
                cells += [ocf, f"{t[ocf] - t['cf']:+.1f}", f"{t[v] - t[ocf]:.1f}", share(t[v] - t[ocf])]
            else:
                cells += ["", "", "", ""]
            e = r.get("rel_err_vs_none")
            cells.append("" if e is None else f"{e:.1e}" + ("" if r.get("correct", True) else " MISMATCH"))
            rows.append(cells)
        skipped += [f"T={T} {r['variant']}: {r['skipped']}" for r in res if r["variant"] not in t]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row))
             for row in rows]
    return [lines[0], "-" * len(lines[0])] + lines[1:] + (["skipped:"] + skipped if skipped else [])


# ------------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------------
def rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout_s, exit=True)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    kw = {"device_id": torch.device("cuda", rank)} if cuda else {}
    # A collective waits at most 3 minutes for the other rank (the engine process reaps a dead one sooner).
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=180), **kw)
    r = Rank(rank, world, args)
    torch.set_grad_enabled(False)
    r.setup(args.variants)
    if not cuda:
        r.say("gloo: all-gather runs as all_gather + cat and reduce-scatter as all_reduce + row slice "
              "(emulated; CPU times say nothing about NCCL)")
    everything = {}
    for T in args.tokens:
        everything[T] = r.run_tokens(T, args.variants)
    if rank == 0:
        print("#", flush=True)
        for line in table(everything):
            print(f"# {line}", flush=True)
        bad = [(T, x["variant"]) for T, res in everything.items() for x in res if x.get("correct") is False]
        if bad:
            print(f"# MISMATCH against none: {bad}", flush=True)
    faulthandler.cancel_dump_traceback_later()
    dist.barrier()
    sys.stdout.flush()
    code = 1 if rank == 0 and bad_any(everything) else 0
    # No destroy_process_group(): after symmetric-memory use it was seen to hang the exit (overlap/worker.py).
    os._exit(code)


def bad_any(everything) -> bool:
    return any(x.get("correct") is False for res in everything.values() for x in res)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        for v in all_variant_names(args.ctas):
            key = "pipe2_ctasN" if "_ctas" in v else re.sub(r"^pipe\d", "pipeK", v)
            print(f"{v:14s} {DESCRIBE[key]}")
        return 0
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args.world, port, argv)) for r in range(args.world)]
    for p in procs:
        p.start()
    # A rank that dies leaves the other blocked in a collective: stop the rest at once, not after
    # NCCL's timeout (device time is the scarce thing); likewise past the whole-run limit.
    deadline = time.monotonic() + args.timeout_s + 30
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.join(5)  # a rank finishing normally gets a moment
        if p.is_alive():
            p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"# ranks exited with {codes}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
