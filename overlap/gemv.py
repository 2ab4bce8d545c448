"""The one-row blocks of a batch-1 decode step in Triton: matrix-vector products in one kernel with a
fixed configuration per shape, and the residual add + RMSNorm between them.

Why: a batch-1 decode step is ~230 weight GEMVs that should each run at the card's read bandwidth.
Under torch.compile Inductor writes such a kernel too, but tunes it in every process by timing
candidates, and its pick (hence TPOT) moved with the process (NOTES-gpu.md, fourth session). Here
the configuration is a table measured once (`scripts/tune_gemv.py`, every layer's weights in turn
so that nothing is served from L2), so every engine process runs the same kernels.

The gate/up projection has its own entry point: both halves of w13 are read by one program and
SiLU(gate) * up is its epilogue, so the intermediate activation never goes through memory twice.

On Hopper every kernel here can be launched with programmatic dependent launch (`pdl`, see
kernels.pdl_args): it starts at its predecessor's tail and streams its first weight columns before
waiting for it. The norm is here so that no kernel without PDL sits between two GEMVs.
"""
from __future__ import annotations

import torch

from .kernels import pdl_args, triton

if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _load_w(ptrs, k0, n, k, N, K: tl.constexpr, EVEN: tl.constexpr):
        """Columns k0.. of this program's weight rows (read once per step: evict first)."""
        if EVEN:
            v = tl.load(ptrs + k0, eviction_policy="evict_first")
        else:
            v = tl.load(ptrs + k0, mask=(n < N)[:, None] & (k0 + k < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
        return v

    @triton.jit
    def _gemv_kernel(x, w, y, N, s_w, up_off, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWIGLU: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        """y[n] = sum_k x[k] w[n, k] for BLOCK_N rows n per program (SWIGLU: silu(that) * the same
        over rows n + up_off). Partial products stay in a [BLOCK_N, BLOCK_K] fp32 accumulator and are
        reduced once at the end. With PDL (programmatic dependent launch) the program lets the next
        kernel launch at once and loads its first weight columns before waiting for the previous
        kernel: weights never change, so only `x` and the store must wait."""
        if PDL:
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        rows = w + n.to(tl.int64)[:, None] * s_w + k[None, :]
        NK: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        wv = _load_w(rows, 0, n, k, N, K, EVEN)
        if SWIGLU:
            uv = _load_w(rows + up_off * s_w, 0, n, k, N, K, EVEN)
        if PDL:
            gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(NK):
            if EVEN:
                xv = tl.load(x + i * BLOCK_K + k).to(tl.float32)[None, :]
            else:
                xv = tl.load(x + i * BLOCK_K + k, mask=i * BLOCK_K + k < K, other=0.0).to(tl.float32)[None, :]
            acc += wv.to(tl.float32) * xv
            if SWIGLU:
                acc_up += uv.to(tl.float32) * xv
            if i + 1 < NK:
                wv = _load_w(rows, (i + 1) * BLOCK_K, n, k, N, K, EVEN)
                if SWIGLU:
                    uv = _load_w(rows + up_off * s_w, (i + 1) * BLOCK_K, n, k, N, K, EVEN)
        out = tl.sum(acc, axis=1)
        if SWIGLU:
            out = out * tl.sigmoid(out) * tl.sum(acc_up, axis=1)
        tl.store(y + n, out.to(y.dtype.element_ty), mask=n < N)

    @triton.jit
    def _add_rms_norm_kernel(x, delta, w, res, h, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
        """One row: res = x + delta (rounded to the activation dtype, as torch's add), h = RMSNorm(res) * w.
        Between two GEMVs so that the whole chain is launched with PDL (an Inductor kernel in it
        would not let the next GEMV start early)."""
        if PDL:
            gdc_launch_dependents()
        d = tl.arange(0, BLOCK)
        m = d < D
        wv = tl.load(w + d, mask=m, other=0.0).to(tl.float32)
        if PDL:
            gdc_wait()
        r = tl.load(x + d, mask=m, other=0.0)
        if HAS_DELTA:
            r = (r.to(tl.float32) + tl.load(delta + d, mask=m, other=0.0).to(tl.float32)).to(r.dtype)
            tl.store(res + d, r, mask=m)
        r = r.to(tl.float32)
        inv = tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
        tl.store(h + d, (r * inv * wv).to(h.dtype.element_ty), mask=m)


# (rows, columns, swiglu) -> (BLOCK_N, BLOCK_K, num_warps): the fastest configuration per shape of
# scripts/tune_gemv.py's sweep on one H200, Llama-3-8B at TP=1 and TP=2 (NOTES-gpu.md, fifth session).
# Shapes not listed take DEFAULT, the best all-rounder of that sweep. No num_stages: these loads feed
# no tl.dot, so Triton does not pipeline them; the column loop has a constant trip count and is unrolled.
CONFIGS: dict[tuple[int, int, bool], tuple[int, int, int]] = {
    (6144, 4096, False): (2, 128, 1), (4096, 4096, False): (4, 1024, 2), (14336, 4096, True): (1, 1024, 2),
    (4096, 14336, False): (1, 256, 1), (128256, 4096, False): (2, 1024, 2),  # TP=1
    (3072, 4096, False): (2, 512, 2), (4096, 2048, False): (1, 1024, 4), (7168, 4096, True): (2, 128, 1),
    (4096, 7168, False): (1, 256, 1), (64128, 4096, False): (2, 1024, 2),  # TP=2
}
DEFAULT = (4, 1024, 2)


def config(n: int, k: int, swiglu: bool) -> tuple[int, int, int]:
    """The kernel configuration for an [n, k] weight (n: output rows, per half for SwiGLU)."""
    return CONFIGS.get((n, k, swiglu), DEFAULT)


def _launch(x: torch.Tensor, w: torch.Tensor, n: int, swiglu: bool, cfg=None, pdl: bool = True) -> torch.Tensor:
    k = w.shape[1]
    assert x.numel() == k and w.stride(1) == 1, (x.shape, w.shape, w.stride())
    block_n, block_k, warps = cfg or config(n, k, swiglu)
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x.reshape(k).contiguous(), w, y, n, w.stride(0), n if swiglu else 0,
        K=k, BLOCK_N=block_n, BLOCK_K=block_k, SWIGLU=swiglu, EVEN=n % block_n == 0 and k % block_k == 0,
        num_warps=warps, num_stages=1, **pdl_args(x.device, pdl))
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, cfg=None, pdl: bool = True) -> torch.Tensor:
    """`x @ w.T` for one row `x` [..., K] (all leading sizes 1) and a weight [N, K] in HF layout."""
    return _launch(x, w, w.shape[0], False, cfg, pdl)


def gemv_swiglu(x: torch.Tensor, w13: torch.Tensor, inter: int, cfg=None, pdl: bool = True) -> torch.Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for one row, with the fused weight w13 = [gate; up] [2 inter, K]."""
    assert w13.shape[0] == 2 * inter, (w13.shape, inter)
    return _launch(x, w13, inter, True, cfg, pdl)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm_w: torch.Tensor, eps: float, pdl: bool = True):
    """model.add_rms_norm for one row: (residual stream, normalised input of the next GEMV)."""
    D = x.shape[-1]
    assert x.numel() == D and x.is_contiguous() and (delta is None or delta.is_contiguous()), (x.shape, delta)
    res = x if delta is None else torch.empty_like(x)
    h = torch.empty_like(x)
    _add_rms_norm_kernel[(1,)](x, x if delta is None else delta, norm_w, res, h, eps, D=D,
                               BLOCK=triton.next_power_of_2(D), HAS_DELTA=delta is not None,
                               num_warps=8 if D >= 2048 else 4, **pdl_args(x.device, pdl))
    return res, h
