"""The Lamport all-reduce kernel (overlap/allreduce_norm.py) on CPU, in one process: plain tensors
stand in for the ranks' symmetric buffers and their addresses for the peer table, and the ranks'
kernels run one after the other. What a peer's kernel would have stored before this rank reads it
is written by the test (with the layout computed here, independently of the kernel), then taken
back out so that the peer's own kernel has to deliver it. Prints one JSON object per scenario and
exits 1 if a check fails. Run as `python -m tests.allreduce_norm_check '{"scenario": ...}'` with
TRITON_INTERPRET=1; tests/test_allreduce_norm.py drives it."""
from __future__ import annotations

import json
import sys

import torch

from overlap.allreduce_norm import SLOTS, LamportAllReduce, sentinel_bits
from overlap.model import add_rms_norm

EPS = 1e-5


def _ints(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` as it travels: -0.0 (the sentinel) sent as +0.0."""
    t = t.clone()
    bits = _ints(t)
    bits[bits == sentinel_bits(t.dtype)] = 0
    return t


def _is_sentinel(t: torch.Tensor) -> torch.Tensor:
    return _ints(t) == sentinel_bits(t.dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(_ints(a.contiguous()), _ints(b.contiguous())))


class Ranks:
    """`world` simulated ranks: a buffer per rank and a LamportAllReduce per rank over them."""

    def __init__(self, world: int, dtype: torch.dtype, hidden: int, max_rows: int, max_spin: int = 3):
        n = SLOTS * world * max_rows * hidden
        self.bufs = [torch.empty(n, dtype=dtype) for _ in range(world)]
        addrs = [b.data_ptr() for b in self.bufs]
        self.ars = [LamportAllReduce(r, world, torch.device("cpu"), dtype, hidden, max_rows, max_spin=max_spin,
                                     buffers=(self.bufs[r], addrs)) for r in range(world)]
        self.world, self.dtype, self.hidden, self.max_rows = world, dtype, hidden, max_rows

    def slots(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s buffer as [slot, source rank, row, hidden]."""
        return self.bufs[rank].view(SLOTS, self.world, self.max_rows, self.hidden)

    def deliver(self, dst: int, src: int, slot: int, part: torch.Tensor) -> None:
        """What rank `src`'s kernel stores into rank `dst`'s buffer for `part`."""
        rows = part.numel() // self.hidden
        self.slots(dst)[slot, src, :rows] = _canonical(part).reshape(rows, self.hidden)

    def undeliver(self, dst: int, src: int, slot: int, rows: int) -> None:
        _ints(self.slots(dst)[slot, src, :rows]).fill_(sentinel_bits(self.dtype))


def _data(rows: int, hidden: int, world: int, dtype: torch.dtype, seed: int):
    """Each rank's part, the residual and the norm weight; the parts carry -0.0 and +0.0 (a -0.0 sum,
    a +0.0 with a -0.0, and x + (-x)) so that the sentinel's neighbours are exercised."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(rows, 1, hidden, generator=g) for _ in range(world)]
    for p in parts:
        p[..., 0] = -0.0
    parts[0][..., 1], parts[1][..., 1] = 0.0, -0.0
    parts[1][..., 2] = -parts[0][..., 2]
    x = torch.randn(rows, 1, hidden, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, generator=g)
    return [p.to(dtype) for p in parts], x.to(dtype), w.to(dtype)


def _reference(parts, x, w, dtype):
    """Rank-order fp32 sum rounded to dtype; residual add as torch's; RMSNorm in fp32 (unrounded)."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc = acc + p.float()
    s = acc.to(dtype)
    res = (x.float() + s.float()).to(dtype)
    rf = res.float()
    h = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
    return s, res, h


def _call(ar: LamportAllReduce, parts, rank, x, w, norm: bool):
    if norm:
        return ar.all_reduce_add_rms_norm(parts[rank], x, w, EPS)
    return (ar.all_reduce(parts[rank]),)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _tol(dtype: torch.dtype) -> float:
    """Of the normalised output: fp32, summation order and rsqrt; fp16, one rounding (2**-11); bf16,
    Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest), up to 2**-7 of a value,
    up to three times (sum, residual, output)."""
    return {torch.float32: 1e-5, torch.float16: 2 ** -10}.get(dtype, 2 ** -6)


def _same(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Bit for bit in fp32 and fp16 (the interpreter rounds fp16 to nearest, as the GPU does); bf16
    within the interpreter's rounding (see _tol)."""
    return _rel(got, ref) <= _tol(got.dtype) if got.dtype == torch.bfloat16 else _bits_equal(got, ref)


def protocol(dtype: str = "float32", hidden: int = 64, rows_seq=(3, 1, 1, 2, 3, 1), norm: bool = True) -> dict:
    """Two ranks over consecutive calls with changing row counts: results, slot rotation, clearing."""
    dt = getattr(torch, dtype)
    tol = _tol(dt)
    R = Ranks(2, dt, hidden, max(rows_seq))
    fails, worst = [], 0.0
    for c, rows in enumerate(rows_seq):
        k = c % SLOTS
        parts, x, w = _data(rows, hidden, 2, dt, seed=c)
        R.deliver(0, 1, k, parts[1])  # rank 1's store into rank 0, ahead of rank 0's kernel
        out0 = _call(R.ars[0], parts, 0, x, w, norm)
        if not _bits_equal(R.slots(1)[k, 0, :rows], _canonical(parts[0]).reshape(rows, hidden)):
            fails.append(f"call {c}: rank 0's row is not in rank 1's buffer at slot {k}, source 0")
        R.undeliver(0, 1, k, rows)  # rank 1's kernel must deliver it itself
        out1 = _call(R.ars[1], parts, 1, x, w, norm)
        if not _bits_equal(R.slots(0)[k, 1, :rows], _canonical(parts[1]).reshape(rows, hidden)):
            fails.append(f"call {c}: rank 1's row is not in rank 0's buffer at slot {k}, source 1")
        if not all(_bits_equal(a, b) for a, b in zip(out0, out1, strict=True)):
            fails.append(f"call {c}: the ranks' results differ in their bits")
        s, res, h = _reference(parts, x, w, dt)
        if norm:
            if not _same(out0[0], res):
                fails.append(f"call {c}: residual != torch's x + (p0 + p1)")
            worst = max(worst, _rel(out0[1], h))
            if dt == torch.float32:  # the torch block it replaces (F.rms_norm)
                mr, mh = add_rms_norm(x, s, w, EPS)
                if not _bits_equal(out0[0], mr) or _rel(out0[1], mh) > tol:
                    fails.append(f"call {c}: differs from model.add_rms_norm")
        else:
            if not _same(out0[0], s):
                fails.append(f"call {c}: all-reduce != torch's p0 + p1")
            if bool((out0[0] == 0).any()) and bool(torch.signbit(out0[0][out0[0] == 0]).any()):
                fails.append(f"call {c}: a zero sum came out as -0.0")
        for r in range(2):
            st = R.ars[r].state.tolist()
            if st[0] != (c + 1) % SLOTS or st[1] != 0 or st[2] != 0 or st[3 + k] != rows:
                fails.append(f"call {c}: rank {r} state {st}, expected slot {(c + 1) % SLOTS}, rows[{k}] = {rows}")
            # After call c only slot k may hold data: the call before's slot was cleared in this call,
            # the one before that in the previous call.
            for other in range(SLOTS):
                if other != k and not bool(_is_sentinel(R.slots(r)[other]).all()):
                    fails.append(f"call {c}: rank {r} slot {other} still holds data")
    return {"scenario": "protocol", "dtype": dtype, "norm": norm, "rows": list(rows_seq), "calls": len(rows_seq),
            "worst_norm_rel_err": worst, "tol": tol, "fails": fails, "ok": not fails and worst <= tol}


def wider(world: int = 4, dtype: str = "float32", hidden: int = 40, rows: int = 2) -> dict:
    """Rank 1 of `world` (a non-power-of-two hidden size: masked lanes), every peer's row delivered
    ahead, two calls of each kind: the rank-order sum, and its row in every peer's buffer."""
    dt = getattr(torch, dtype)
    R = Ranks(world, dt, hidden, rows)
    me, fails, worst = 1, [], 0.0
    for c, norm in enumerate((False, True, False, True)):
        k = c % SLOTS
        parts, x, w = _data(rows, hidden, world, dt, seed=100 + c)
        for src in range(world):
            if src != me:
                R.deliver(me, src, k, parts[src])
        out = _call(R.ars[me], parts, me, x, w, norm)
        s, res, h = _reference(parts, x, w, dt)
        if norm:
            worst = max(worst, _rel(out[1], h))
            if not _same(out[0], res):
                fails.append(f"call {c}: residual differs")
        elif not _same(out[0], s):
            fails.append(f"call {c}: sum != rank-order fp32 sum")
        for dst in range(world):
            if dst != me and not _bits_equal(R.slots(dst)[k, me, :rows], _canonical(parts[me]).reshape(rows, hidden)):
                fails.append(f"call {c}: rank {me}'s row missing from rank {dst}'s buffer")
        if R.ars[me].state[2].item():
            fails.append(f"call {c}: error flag set")
    return {"scenario": "wider", "world": world, "hidden": hidden, "worst_norm_rel_err": worst, "fails": fails,
            "ok": not fails and worst <= _tol(dt)}


def late_peer(dtype: str = "float32", hidden: int = 64) -> dict:
    """A peer that never sends (or sends all but one element): the kernel gives up after max_spin
    polls, raises the error flag, and check() turns it into an exception."""
    dt = getattr(torch, dtype)
    fails = []
    for missing in ("row", "last element"):
        R = Ranks(2, dt, hidden, 2, max_spin=4)
        parts = _data(2, hidden, 2, dt, seed=7)[0]
        if missing == "last element":
            R.deliver(0, 1, 0, parts[1])
            _ints(R.slots(0)[0, 1, 1, hidden - 1:]).fill_(sentinel_bits(dt))
        R.ars[0].all_reduce(parts[0])
        try:
            R.ars[0].check()
            fails.append(f"peer missing its {missing}: check() did not raise")
        except RuntimeError as e:
            if "timed out" not in str(e):
                fails.append(f"unexpected error: {e}")
    return {"scenario": "late_peer", "fails": fails, "ok": not fails}


def refusals() -> dict:
    """why_not's reasons, and calls that must be refused rather than run."""
    R = Ranks(2, torch.float32, 64, 4)
    ar = R.ars[0]
    x = torch.randn(2, 1, 64)
    w = torch.ones(64)
    cases = {
        "fits": (ar.why_not(x, x, w), None),
        "too many rows": (ar.why_not(torch.randn(5, 64)), "rows"),
        "dtype": (ar.why_not(x.half()), "dtype"),
        "hidden": (ar.why_not(torch.randn(2, 32)), "last dimension"),
        "transposed": (ar.why_not(torch.randn(64, 2).t()), "contiguous"),
        "strided rows": (ar.why_not(torch.randn(2, 128)[:, ::2]), "contiguous"),
        "residual shape": (ar.why_not(x, torch.randn(1, 1, 64), w), "residual"),
        "residual strided": (ar.why_not(x[:1], torch.randn(1, 128)[:, ::2].unsqueeze(0), w), "residual"),
        "weight": (ar.why_not(x, x, torch.ones(32)), "weight"),
        "scalar": (ar.why_not(torch.tensor(1.0)), "shape"),
    }
    fails = [f"{name}: got {got!r}, expected {want!r}" for name, (got, want) in cases.items()
             if (want is None) != (got is None) or (want is not None and want not in got)]
    for name, fn in (("all_reduce of 5 rows", lambda: ar.all_reduce(torch.randn(5, 64))),
                     ("fused with a bad weight", lambda: ar.all_reduce_add_rms_norm(x, x, torch.ones(3), EPS))):
        try:
            fn()
            fails.append(f"{name}: ran")
        except ValueError:
            pass
    if ar.state.tolist() != [0] * len(ar.state):
        fails.append(f"a refused call touched the state: {ar.state.tolist()}")
    bad = [("wrong buffer size", (torch.empty(10), [0, 0])),
           ("own address missing", (R.bufs[0], [0, R.bufs[1].data_ptr()]))]
    for name, buffers in bad:
        try:
            LamportAllReduce(0, 2, torch.device("cpu"), torch.float32, 64, 4, buffers=buffers)
            fails.append(f"{name}: accepted")
        except ValueError:
            pass
    return {"scenario": "refusals", "fails": fails, "ok": not fails}


SCENARIOS = {"protocol": protocol, "wider": wider, "late_peer": late_peer, "refusals": refusals}


def main() -> int:
    case = json.loads(sys.argv[1])
    res = SCENARIOS[case.pop("scenario")](**case)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
