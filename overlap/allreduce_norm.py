"""A low-latency one-shot all-reduce over symmetric memory in one Triton kernel, alone or fused with
the residual add and RMSNorm that follow it in a decoder (all-reduce -> x + delta -> RMSNorm * w).

Why: at batch 1 each sublayer's all-reduce is an 8 KB message, and today it is a copy into the
symmetric buffer, a one-shot kernel whose barrier costs an NVLink round trip before any data moves,
then a separate norm kernel that reads the sum again. Here each rank stores its row straight into
every peer's buffer and the data is its own flag (a Lamport protocol, as in TensorRT-LLM's and
FlashInfer's fused all-reduce): the buffer holds a sentinel that data never takes (-0.0; a -0.0 in
the data is sent as +0.0), and a reader spins until no element of a peer's row is the sentinel. No
barrier, one kernel, one pass over the activation.

Buffers rotate over three slots so that no barrier is needed to reuse them: in call c (slot c % 3)
a rank clears slot (c + 2) % 3, which every peer finished writing in call c - 1 (this rank has read
those rows, so every store has landed) and which no peer writes before call c + 2 (a peer can be at
most one call ahead: to finish call c + 1 it needs this rank's call c + 1 data, sent only after call c
is done). The slot index comes from a call counter on the device, so a CUDA graph replays it
correctly; every rank must therefore make the same sequence of calls with the same row counts.

The kernel is checked on CPU through Triton's interpreter with plain tensors standing in for the
ranks' buffers (tests/test_allreduce_norm.py); scripts/bench_allreduce.py measures it on GPUs.
"""
from __future__ import annotations

import torch

from .kernels import pdl_args, triton
from .kernels import unavailable_reason as triton_unavailable_reason

SLOTS = 3
MAX_WORLD = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Polls of a peer's row before the kernel gives up and raises the error flag: a desync (ranks making
# different calls) becomes an error that `check()` reports instead of a hang. Generous on purpose: a
# peer may legitimately be seconds behind (its first call compiles the kernel).
SPIN_LIMIT = 1 << 27
# state[]: slot of the next call, programs finished in this call, error flag, rows written per slot.
_CALL, _DONE, _ERROR, _ROWS = 0, 1, 2, 3
_STATE_LEN = _ROWS + SLOTS


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype.itemsize == 4 else torch.int16


def sentinel_bits(dtype: torch.dtype) -> int:
    """The sentinel as the signed integer of its bits: -0.0 (only the sign bit set)."""
    return -(1 << (8 * dtype.itemsize - 1))


def unavailable_reason(device: torch.device, world: int, dtype: torch.dtype, hidden: int,
                       max_rows: int) -> str | None:
    """Why a LamportAllReduce cannot be built for these arguments (None: it can)."""
    why = triton_unavailable_reason(device)
    if why:
        return why
    if not 2 <= world <= MAX_WORLD:
        return f"world size {world}: the Lamport all-reduce needs 2..{MAX_WORLD} ranks"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of {DTYPES}"
    if hidden <= 0 or hidden * dtype.itemsize % 16:
        return f"hidden size {hidden} x {dtype.itemsize} bytes is not a whole number of 16-byte vectors"
    if max_rows < 1:
        return f"max_rows {max_rows} < 1"
    if SLOTS * world * max_rows * hidden >= 2 ** 31:
        return f"buffer of {SLOTS} x {world} x {max_rows} x {hidden} elements needs 64-bit offsets"
    return None


if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    # The state layout and slot count as the kernel sees them (a kernel reads only constexpr globals).
    _K_SLOTS, _K_CALL, _K_DONE, _K_ERROR, _K_ROWS = (tl.constexpr(v) for v in (SLOTS, _CALL, _DONE, _ERROR, _ROWS))

    @triton.jit
    def _bits(v, WIDE: tl.constexpr):
        """The bits of `v` as a signed integer of the same width."""
        if WIDE:
            b = v.to(tl.int32, bitcast=True)
        else:
            b = v.to(tl.int16, bitcast=True)
        return b

    @triton.jit
    def _lamport_kernel(part, res_in, weight, res_out, out, buf, peers, state, eps, max_spin,
                        RANK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr, SENT: tl.constexpr, NORM: tl.constexpr,
                        PDL: tl.constexpr):
        """One row per program: send this rank's row of `part` to every peer's buffer, clear the
        stale slot, wait for every peer's row, sum in rank order in fp32 (every rank computes the same
        bits), round to the activation dtype; with NORM, res_out = res_in + sum (rounded, as torch's
        add) and out = RMSNorm(res_out) * weight in fp32, else out = sum.

        buf: this rank's buffer [SLOTS, WORLD (source), MAX_ROWS, D]; peers: int64 addresses of every
        rank's buffer (its own entry unused); state: int32 [call slot, done, error, rows per slot]."""
        if PDL:  # the next kernel may launch now; it waits for this one before reading anything
            gdc_launch_dependents()
        row = tl.program_id(0)
        n_rows = tl.num_programs(0)
        d = tl.arange(0, BLOCK)
        m = d < D
        dt = part.dtype.element_ty
        if NORM:
            wv = tl.load(weight + d, mask=m, other=0.0).to(tl.float32)  # never written: before the wait
        if PDL:
            gdc_wait()  # `part`, the counter and the buffers were written by earlier kernels
        call = tl.load(state + _K_CALL, volatile=True)
        slot = call % _K_SLOTS
        stale = (call + 2) % _K_SLOTS

        # 1. Send: this rank's row into slot `slot`, source RANK, of every peer (NVLink stores). A -0.0
        # in the data would read as "not arrived": it goes out as +0.0 (and is summed as such here).
        bits = _bits(tl.load(part + row * D + d, mask=m, other=0.0), WIDE)
        mine = tl.where(bits == SENT, tl.zeros_like(bits), bits).to(dt, bitcast=True)
        for r in tl.static_range(WORLD):
            if r != RANK:
                dst = tl.multiple_of(tl.load(peers + r).to(tl.pointer_type(dt)), 16)
                tl.store(dst + ((slot * WORLD + RANK) * MAX_ROWS + row) * D + d, mine, mask=m)

        # 2. Clear the stale slot (see the module docstring for why nobody can be using it): the rows
        # the call that last used it wrote, spread over this call's programs, whatever their number.
        old_rows = tl.load(state + _K_ROWS + stale, volatile=True)
        sentinel = tl.full([BLOCK], SENT, tl.int32 if WIDE else tl.int16).to(dt, bitcast=True)
        j = row
        while j < old_rows:
            for r in tl.static_range(WORLD):
                if r != RANK:
                    tl.store(buf + ((stale * WORLD + r) * MAX_ROWS + j) * D + d, sentinel, mask=m)
            j += n_rows
        if row == 0:
            tl.store(state + _K_ROWS + slot, n_rows)

        # 3. Receive and sum in rank order; poll each peer's row (volatile: from L2, where NVLink
        # stores land) until no element is the sentinel, or give up after max_spin polls.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                acc += mine.to(tl.float32)
            else:
                src = buf + ((slot * WORLD + r) * MAX_ROWS + row) * D + d
                x = tl.load(src, mask=m, other=0.0, volatile=True)
                missing = tl.sum(tl.where(m & (_bits(x, WIDE) == SENT), 1, 0), axis=0)
                spins = 0
                while (missing > 0) & (spins < max_spin):
                    x = tl.load(src, mask=m, other=0.0, volatile=True)
                    missing = tl.sum(tl.where(m & (_bits(x, WIDE) == SENT), 1, 0), axis=0)
                    spins += 1
                if missing > 0:
                    tl.store(state + _K_ERROR, 1)
                acc += x.to(tl.float32)
        total = acc.to(dt)  # rounded as an all-reduce's output would be
        if NORM:
            res = (tl.load(res_in + row * D + d, mask=m, other=0.0).to(tl.float32) + total.to(tl.float32)).to(dt)
            tl.store(res_out + row * D + d, res, mask=m)
            rf = res.to(tl.float32)
            inv = tl.rsqrt(tl.sum(rf * rf, axis=0) / D + eps)
            tl.store(out + row * D + d, (rf * inv * wv).to(dt), mask=m)
        else:
            tl.store(out + row * D + d, total, mask=m)

        # 4. The last program to finish moves the call counter on. Every program read the counter
        # before its acq_rel increment of `done`, so none can see the new value in this call.
        tl.debug_barrier()
        done = tl.atomic_add(state + _K_DONE, 1, sem="acq_rel")
        if done == n_rows - 1:
            tl.store(state + _K_DONE, 0)
            tl.store(state + _K_CALL, (call + 1) % _K_SLOTS)


class LamportAllReduce:
    """One rank's Lamport all-reduce (and its fusion with residual add + RMSNorm) for up to `max_rows`
    rows of `hidden` elements of `dtype`.

    Built collectively (every rank of `group_name` constructs one with the same arguments): allocates
    one symmetric-memory buffer of SLOTS x world x max_rows x hidden elements, fills it with the
    sentinel, barriers, and checks one all-reduce. `buffers=(buf, peer_addresses)` skips all that
    and uses the given tensors as this rank's buffer and the ranks' buffer addresses (CPU tests).

    Every rank must make the same calls in the same order with the same row counts (the device-side
    counter picks the slot); calls must not run concurrently on two streams."""

    def __init__(self, rank: int, world: int, device: torch.device, dtype: torch.dtype, hidden: int,
                 max_rows: int, group_name: str | None = None, *, pdl: bool = True, max_spin: int = SPIN_LIMIT,
                 buffers: tuple[torch.Tensor, list[int]] | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # compared with tensors' devices, which have one
            device = torch.device("cuda", torch.cuda.current_device())
        why = unavailable_reason(device, world, dtype, hidden, max_rows)
        if why:
            raise RuntimeError(f"Lamport all-reduce unavailable: {why}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        if not 1 <= max_spin < 2 ** 31:
            raise ValueError(f"max_spin {max_spin} outside 1..2**31-1")
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype
        self.hidden, self.max_rows, self.max_spin, self.pdl = hidden, max_rows, max_spin, pdl
        numel = SLOTS * world * max_rows * hidden
        self._handle = None
        if buffers is None:
            buf, peers = self._symmetric_buffer(numel, group_name)
        else:
            buf, peers = buffers
            if buf.numel() != numel or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
                raise ValueError(f"buffer must be {numel} contiguous {dtype} elements on {device}")
            if len(peers) != world or peers[rank] != buf.data_ptr():
                raise ValueError("peer addresses must list every rank's buffer, this rank's own at `rank`")
        self.buf = buf
        self.peers = torch.tensor(peers, dtype=torch.int64, device=device)
        self.state = torch.zeros(_STATE_LEN, dtype=torch.int32, device=device)
        self.buf.view(_int_view(dtype)).fill_(sentinel_bits(dtype))
        if self._handle is not None:
            torch.cuda.synchronize(device)  # every rank's sentinel is in place before anyone sends
            self._handle.barrier(channel=0)
            torch.cuda.synchronize(device)
            self._self_test()

    def _symmetric_buffer(self, numel: int, group_name: str | None) -> tuple[torch.Tensor, list[int]]:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        from torch.distributed.distributed_c10d import _resolve_process_group

        if self.device.type != "cuda":
            raise RuntimeError(f"symmetric memory needs CUDA, not {self.device}")
        group_name = group_name or dist.group.WORLD.group_name
        buf = symm_mem.empty(numel, dtype=self.dtype, device=self.device)
        handle = symm_mem.rendezvous(buf, group_name)
        if handle.rank != self.rank or handle.world_size != self.world:
            raise RuntimeError(f"group {group_name} has this process as rank {handle.rank} of "
                               f"{handle.world_size}, not {self.rank} of {self.world}")
        # buffer_ptrs are the starts of the ranks' allocations; a tensor from a memory pool may start
        # inside it. The same offset on every rank is what makes the layout symmetric: checked.
        offset = buf.data_ptr() - handle.buffer_ptrs[self.rank]
        offsets: list = [None] * self.world
        with torch.cuda.device(self.device):
            dist.all_gather_object(offsets, offset, group=_resolve_process_group(group_name))
        if len(set(offsets)) != 1:
            raise RuntimeError(f"symmetric buffer offsets differ between ranks: {offsets}")
        self._handle = handle  # keeps the peers' mappings alive as long as this object
        return buf, [p + offset for p in handle.buffer_ptrs]

    def _self_test(self) -> None:
        """One all-reduce of known values, checked before the buffer is trusted (also compiles)."""
        x = torch.full((1, self.hidden), float(self.rank + 1), device=self.device, dtype=self.dtype)
        out = self.all_reduce(x)
        want = self.world * (self.world + 1) / 2
        self.check()
        if not torch.all(out == want):
            raise RuntimeError(f"Lamport all-reduce self-test gave {out.flatten()[0].item()}, expected {want}")

    # -- when it applies -----------------------------------------------------------------------------
    def why_not(self, part: torch.Tensor, residual: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> str | None:
        """Why `part` (and, for the fused call, `residual` and the norm `weight`) cannot go through
        this all-reduce (None: it can). The caller takes another path and logs the reason."""
        if part.device != self.device:
            return f"tensor on {part.device}, buffer on {self.device}"
        if part.dtype != self.dtype:
            return f"dtype {part.dtype}, buffer holds {self.dtype}"
        if part.dim() == 0 or part.shape[-1] != self.hidden:
            return f"shape {tuple(part.shape)}: last dimension must be {self.hidden}"
        rows = part.numel() // self.hidden
        if not 1 <= rows <= self.max_rows:
            return f"{rows} rows, buffer holds 1..{self.max_rows}"
        if not part.is_contiguous():
            return "not contiguous"
        if residual is not None:
            if residual.shape != part.shape or residual.dtype != part.dtype or residual.device != part.device:
                return f"residual {tuple(residual.shape)} {residual.dtype} does not match part {tuple(part.shape)}"
            if not residual.is_contiguous():
                return "residual not contiguous"
        if weight is not None and (weight.shape != (self.hidden,) or weight.device != self.device
                                   or not weight.is_contiguous()):
            return f"norm weight {tuple(weight.shape)} on {weight.device}: must be contiguous ({self.hidden},)"
        return None

    # -- calls ---------------------------------------------------------------------------------------
    def all_reduce(self, part: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `part` [..., hidden] (a new tensor of the same shape)."""
        out = torch.empty_like(part)
        self._launch(part, part, part, part, out, 0.0, False, self.why_not(part))
        return out

    def all_reduce_add_rms_norm(self, part: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + sum of every rank's `part`, RMSNorm of that * weight): model.add_rms_norm
        applied to the all-reduced `part`, in one kernel."""
        res, h = torch.empty_like(residual), torch.empty_like(residual)
        self._launch(part, residual, weight, res, h, eps, True, self.why_not(part, residual, weight))
        return res, h

    def _launch(self, part, res_in, weight, res_out, out, eps: float, norm: bool, why: str | None) -> None:
        if why:
            raise ValueError(f"Lamport all-reduce cannot take this tensor: {why}")
        rows = part.numel() // self.hidden
        _lamport_kernel[(rows,)](
            part, res_in, weight, res_out, out, self.buf, self.peers, self.state, eps, self.max_spin,
            RANK=self.rank, WORLD=self.world, MAX_ROWS=self.max_rows, D=self.hidden,
            BLOCK=triton.next_power_of_2(self.hidden), WIDE=self.dtype.itemsize == 4,
            SENT=sentinel_bits(self.dtype), NORM=norm, num_warps=8 if self.hidden >= 2048 else 4,
            **pdl_args(self.device, self.pdl))

    def check(self) -> None:
        """Raise if a call gave up waiting for a peer (ranks out of step); synchronises the device.
        After that the buffers are in an unknown state: the object must not be used again."""
        if int(self.state[_ERROR].item()):
            raise RuntimeError(f"rank {self.rank}: a Lamport all-reduce timed out waiting for a peer "
                               f"({self.max_spin} polls): the ranks made different calls")

    def memory_bytes(self) -> int:
        """Bytes of symmetric memory this rank holds (each peer maps the same amount)."""
        return self.buf.numel() * self.buf.element_size()
