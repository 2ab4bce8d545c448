"""The Triton kernels against the model's own torch code for one case: `kernels.decode_attention`
against `attend` (RoPE, cache write, SDPA); with `"gemv": true` in the case, `gemv.gemv` /
`gemv.gemv_swiglu` against `matvec` / `swiglu_up`; with `"norm": true`, `gemv.add_rms_norm` against
the model's `add_rms_norm`. Prints the largest differences (relative to the
largest value) as JSON, exits 1 past the tolerance. Run as `python -m tests.kernel_check '{"B": 2, ...}'`
(with TRITON_INTERPRET=1 on CPU); tests/test_kernels.py drives it."""
from __future__ import annotations

import json
import sys

import torch

from overlap import gemv, kernels
from overlap.model import add_rms_norm, attend, matvec, swiglu_up


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check(B: int, H: int, KV: int, D: int, T: int, pos: int, dtype: str = "float32", device: str = "cpu",
          seed: int = 0, block_t: int = kernels.Tuning().attention_block_t) -> dict:
    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * KV) * D, generator=g).to(dev, dt)
    cache = [torch.randn(B, KV, T, D, generator=g).to(dev, dt) for _ in range(2)]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
    ang = torch.outer(torch.arange(T, device=dev, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    p = torch.tensor([pos], device=dev)
    # Reference: the model's path (keys past `pos` hold garbage and must be masked out).
    kr, vr = (c.clone() for c in cache)
    visible = torch.arange(T, device=dev)[None, :] <= p[:, None]
    mask = torch.zeros(visible.shape, device=dev, dtype=dt).masked_fill_(~visible, float("-inf"))
    ref = attend(qkv, kr, vr, cos[p][None, :, None, :], sin[p][None, :, None, :], p,
                 mask.repeat(H // KV, 1), H, KV, D).reshape(B, -1)
    kk, vk = (c.clone() for c in cache)
    counters = torch.zeros(B * KV, dtype=torch.int32, device=dev)
    got = kernels.decode_attention(qkv, cos, sin, p, kk, vk, H, KV, counters,
                                   kernels.Tuning(attention_block_t=block_t))
    # Relative, not absolute: bf16 rounds RoPE once here, twice in the model.
    return {"out": rel_err(got, ref), "k_cache": rel_err(kk, kr), "v_cache": rel_err(vk, vr),
            "untouched_rows_equal": bool(torch.equal(kk[:, :, :pos], kr[:, :, :pos])),
            "counters_back_to_zero": not bool(counters.any())}


def check_gemv(n: int, k: int, swiglu: bool, cfg: list | None = None, dtype: str = "float32",
               device: str = "cpu", seed: int = 0) -> dict:
    """One [n, k] weight (per half for SwiGLU) and one input row, through the kernel with `cfg`
    (BLOCK_N, BLOCK_K, warps; None: the shape's table entry) and through the torch blocks."""
    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, 1, k, generator=g).to(dev, dt)
    w = (torch.randn(2 * n if swiglu else n, k, generator=g) * k ** -0.5).to(dev, dt)
    cfg = tuple(cfg) if cfg else None
    if swiglu:
        got, ref = gemv.gemv_swiglu(x, w, n, cfg), swiglu_up(x.float(), w.float(), n)
    else:
        got, ref = gemv.gemv(x, w, cfg), matvec(x.float(), w.float())
    return {"out": rel_err(got, ref),
            "shape_ok": got.shape == ref.shape and got.dtype == dt}


def check_norm(d: int, delta: bool, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> dict:
    """One row of width `d` (with or without the residual add) through the kernel and the torch block."""
    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, dx = (torch.randn(1, 1, d, generator=g).to(dev, dt) for _ in range(2))
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dev, dt)
    dx = dx if delta else None
    (r, h), (rr, hr) = gemv.add_rms_norm(x, dx, w, 1e-5), add_rms_norm(x, dx, w, 1e-5)
    return {"out": max(rel_err(r, rr), rel_err(h, hr)), "shape_ok": r.shape == x.shape == h.shape and h.dtype == dt}


def main() -> int:
    case = json.loads(sys.argv[1])
    tol = case.pop("tol", 1e-5)
    for kind, fn in (("gemv", check_gemv), ("norm", check_norm)):
        if case.pop(kind, False):
            res = fn(**case)
            print(json.dumps(res))
            return 0 if res["out"] <= tol and res["shape_ok"] else 1
    res = check(**case)
    print(json.dumps(res))
    ok = max(res["out"], res["k_cache"], res["v_cache"]) <= tol and res["untouched_rows_equal"] \
        and res["counters_back_to_zero"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
