"""One Triton kernel for the decode step's attention: RoPE on this step's q and k, the K/V cache write
and attention over the cache, for one new token per sequence.

Why: done as RoPE + two cache scatters + SDPA, the attention sublayer of a decode step is five
latency-bound kernels around ~1 MB of cache reads per layer (NOTES-gpu.md, third session). Here it is
one kernel per layer: each (sequence, KV head) is split over blocks of keys, one thread block each,
that read the cache once for all G query heads sharing it (GQA) and skip the keys past the current
position; the last block to finish combines the partial softmaxes (flash-decoding, in one launch).

Triton is optional: `choose()` says which decode attention (and which batch-1 GEMV, overlap/gemv.py)
runs here. On CPU the tests run the kernels through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from llm_bench.options import KERNEL_CHOICES

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class Tuning(NamedTuple):
    """Launch choices of the step's Triton kernels, set per engine (EngineConfig) or by a script."""
    pdl: bool = True              # programmatic dependent launch where the GPU has it (Hopper and later)
    attention_block_t: int = 64   # decode attention: keys per thread block (scripts/tune_decode_attention.py)
    attention_warps: int = 4


DEFAULT_TUNING = Tuning()


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process (None: they can)."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need a CUDA device here, not {device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    return None


def pdl_args(device: torch.device, pdl: bool) -> dict:
    """Launch arguments of a Triton kernel with a `PDL` constexpr on `device`: programmatic dependent
    launch on Hopper and later when `pdl` (not in Triton's CPU interpreter, which has no
    griddepcontrol). A kernel launched so may start while the previous one finishes; it waits
    (gdc_wait) before it reads anything an earlier kernel wrote."""
    on = pdl and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def choose(kind: str, choice: str, device: torch.device) -> str:
    """The path that runs for `kind` ("decode_attention" or "gemv") given `choice`: `auto` is the
    Triton kernel wherever it can run, else the torch path; `triton` where it cannot is an error,
    not a silent fallback."""
    choices = KERNEL_CHOICES[kind]
    torch_path = choices[2]
    if choice not in choices:
        raise ValueError(f"{kind} must be one of {', '.join(choices)}, got {choice!r}")
    why = None if choice == torch_path else unavailable_reason(device)
    if choice == "triton" and why:
        raise RuntimeError(f"{kind} 'triton' cannot run here: {why}")
    return torch_path if choice == torch_path or why else "triton"


if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _decode_attention_kernel(
        qkv, cos, sin, pos_ptr, k_cache, v_cache, out, part_m, part_l, part_o, counters,
        s_qkv_b, s_kc_b, s_kc_h, s_kc_t, s_vc_b, s_vc_h, s_vc_t, s_out_b,
        n_heads, n_kv, n_split, scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # launched early, at the QKV GEMV's tail: everything here reads what earlier kernels wrote
            gdc_launch_dependents()
            gdc_wait()
        pid = tl.program_id(0)  # (sequence, KV head)
        split = tl.program_id(1)  # which BLOCK_T keys
        b = pid // n_kv
        h = pid % n_kv
        p = tl.load(pos_ptr)
        start = split * BLOCK_T
        if start <= p:  # blocks past the current position have nothing to do
            d = tl.arange(0, BLOCK_D)
            dm = d < D
            half: tl.constexpr = D // 2
            # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after (HF's convention).
            rot = tl.where(d < half, d + half, d - half)
            sign = tl.where(d < half, -1.0, 1.0)
            c = tl.load(cos + p * D + d, mask=dm, other=0.0).to(tl.float32)
            s = tl.load(sin + p * D + d, mask=dm, other=0.0).to(tl.float32)
            row = qkv + b * s_qkv_b
            # This step's k (RoPE applied) and v of KV head h; the block holding p stores them.
            k_off = (n_heads + h) * D
            k_new = tl.load(row + k_off + d, mask=dm, other=0.0).to(tl.float32) * c + \
                tl.load(row + k_off + rot, mask=dm, other=0.0).to(tl.float32) * sign * s
            k_new = k_new.to(k_cache.dtype.element_ty)
            v_new = tl.load(row + (n_heads + n_kv + h) * D + d, mask=dm, other=0.0)
            kc = k_cache + b * s_kc_b + h * s_kc_h
            vc = v_cache + b * s_vc_b + h * s_vc_h
            t = start + tl.arange(0, BLOCK_T)
            if p < start + BLOCK_T:
                tl.store(kc + p * s_kc_t + d, k_new, mask=dm)
                tl.store(vc + p * s_vc_t + d, v_new, mask=dm)
            # The G query heads of KV head h, RoPE applied, rows padded to BLOCK_G (tl.dot needs >= 16).
            g = tl.arange(0, BLOCK_G)
            gm = g < G
            q_ptr = row + (h * G + g[:, None]) * D
            qm = gm[:, None] & dm[None, :]
            q = tl.load(q_ptr + d[None, :], mask=qm, other=0.0).to(tl.float32) * c[None, :] + \
                tl.load(q_ptr + rot[None, :], mask=qm, other=0.0).to(tl.float32) * (sign * s)[None, :]
            q = q.to(k_cache.dtype.element_ty)
            # This block's keys; row p comes from registers (it was just stored).
            tm = t <= p
            here = (t == p)[:, None]
            km = tm[:, None] & dm[None, :]
            kb = tl.where(here, k_new[None, :], tl.load(kc + t[:, None] * s_kc_t + d[None, :], mask=km, other=0.0))
            vb = tl.where(here, v_new[None, :], tl.load(vc + t[:, None] * s_vc_t + d[None, :], mask=km, other=0.0))
            if IEEE:
                sc = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(kb))
            sc = tl.where(tm[None, :], sc * scale, float("-inf"))
            m = tl.max(sc, axis=1)
            pr = tl.exp(sc - m[:, None])
            l_ = tl.sum(pr, axis=1)
            if IEEE:
                o = tl.dot(pr.to(vb.dtype), vb, input_precision="ieee")
            else:
                o = tl.dot(pr.to(vb.dtype), vb)
            # Partial results of this block, then the last block to finish combines them all.
            slot = (pid * n_split + split) * G
            tl.store(part_m + slot + g, m, mask=gm)
            tl.store(part_l + slot + g, l_, mask=gm)
            tl.store(part_o + (slot + g[:, None]) * D + d[None, :], o, mask=qm)
            tl.debug_barrier()  # every thread's partial stores come before the release below
            done = tl.atomic_add(counters + pid, 1, sem="acq_rel")
            n_active = p // BLOCK_T + 1
            if done == n_active - 1:
                tl.debug_barrier()
                mx = tl.full([BLOCK_G], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_G], tl.float32)
                acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                i = 0
                while i < n_active:  # a while: Triton's interpreter can't take range() of a loaded value
                    at = (pid * n_split + i) * G
                    mi = tl.load(part_m + at + g, mask=gm, other=0.0, cache_modifier=".cg")
                    li = tl.load(part_l + at + g, mask=gm, other=0.0, cache_modifier=".cg")
                    oi = tl.load(part_o + (at + g[:, None]) * D + d[None, :], mask=qm, other=0.0,
                                 cache_modifier=".cg")
                    mn = tl.maximum(mx, mi)
                    a_old = tl.exp(mx - mn)
                    a_new = tl.exp(mi - mn)
                    den = den * a_old + li * a_new
                    acc = acc * a_old[:, None] + oi * a_new[:, None]
                    mx = mn
                    i += 1
                res = acc / tl.where(gm, den, 1.0)[:, None]  # padded rows: 0/0 otherwise
                tl.store(out + b * s_out_b + (h * G + g[:, None]) * D + d[None, :], res.to(out.dtype.element_ty),
                         mask=qm)
                tl.store(counters + pid, 0)  # ready for the next call


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                     counters: torch.Tensor, tuning: Tuning = DEFAULT_TUNING) -> torch.Tensor:
    """Attention output [B, n_heads * D] for one new token per sequence.

    `qkv` [B, (n_heads + 2 n_kv) * D] is the QKV projection before RoPE, `cos`/`sin` the [max_seq, D]
    tables, `pos` a one-element tensor (the position of this token in every sequence, read on the
    device so a CUDA graph can replay it), caches [B, n_kv, max_seq, D]. Writes k and v at `pos`.

    Flash-decoding: each (sequence, KV head) is split over blocks of `tuning.attention_block_t` keys (one thread block
    each: a single one per head left 8 SMs waiting on loads in turn), and the last block to finish
    combines the partial softmaxes. `counters` (int32 zeros, >= B * n_kv, kept by the caller) counts
    the finished blocks; the combining block sets its counter back to zero."""
    block_t, num_warps = tuning.attention_block_t, tuning.attention_warps
    B = qkv.shape[0]
    T, D = k_cache.shape[-2], k_cache.shape[-1]
    G = n_heads // n_kv
    qkv = qkv.reshape(B, -1)
    assert qkv.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert counters.dtype == torch.int32 and counters.numel() >= B * n_kv
    n_split = triton.cdiv(T, block_t)
    out = torch.empty(B, n_heads * D, device=qkv.device, dtype=qkv.dtype)
    part_m = torch.empty(B * n_kv * n_split * G, device=qkv.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty(B * n_kv * n_split * G * D, device=qkv.device, dtype=torch.float32)
    _decode_attention_kernel[(B * n_kv, n_split)](
        qkv, cos, sin, pos, k_cache, v_cache, out, part_m, part_l, part_o, counters,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0),
        n_heads, n_kv, n_split, D ** -0.5,
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_T=block_t, IEEE=qkv.dtype == torch.float32, num_warps=num_warps, **pdl_args(qkv.device, tuning.pdl))
    return out
