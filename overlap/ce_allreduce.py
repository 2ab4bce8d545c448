"""An all-reduce whose data is moved by the GPU's copy engines through symmetric memory instead of by
SM kernels, for large messages that run beside a GEMM (pipelined prefill chunks): NCCL's kernels take
SMs from the GEMM next to them, the copy engines do not (PyTorch's "low-contention collectives" in
torch/distributed/_symmetric_memory; measured in NOTES-gpu.md, sixth session).

Reduce-scatter then all-gather, each a cudaMemcpy from the peers' buffers: this rank's partial goes
into its slot; barrier; each peer's partial of this rank's rows is pulled and added (one small
kernel); barrier; each peer's reduced rows are pulled; barrier (no peer still reads the slot when the
next call overwrites it). One slot per pipeline chunk, so chunks in flight never share a buffer.
"""
from __future__ import annotations

import torch


class CopyEngineAllReduce:
    """All-reduce of [n, hidden] rows (n a multiple of the world size) through `slots` symmetric
    buffers of up to `max_rows` rows; a caller may have its GEMM write into `dest(slot, n)` to save
    the copy in."""

    def __init__(self, rank: int, world: int, slots: int, max_rows: int, hidden: int, buf, hdl):
        """`buf`: this rank's buffer of slots x max_rows x hidden elements; `hdl`: its handle
        (get_buffer(peer, sizes, dtype, storage_offset) and barrier(channel))."""
        self.rank, self.world, self.hidden, self.dtype = rank, world, hidden, buf.dtype
        self.slot_elems = max_rows * hidden
        self.slots = slots
        if buf.numel() < slots * self.slot_elems:
            raise ValueError(f"buffer of {buf.numel()} elements < {slots} slots x {self.slot_elems}")
        self.buf, self.hdl = buf, hdl
        self.tmp = torch.empty(((world - 1) * (max_rows // world), hidden), dtype=buf.dtype, device=buf.device)

    @classmethod
    def symmetric(cls, group_name: str, rank: int, world: int, slots: int, max_rows: int, hidden: int,
                  dtype, device) -> CopyEngineAllReduce:
        """On GPUs: the buffer from symmetric memory, rendezvoused over `group_name` (collective)."""
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(slots * max_rows * hidden, dtype=dtype, device=device)
        return cls(rank, world, slots, max_rows, hidden, buf, symm_mem.rendezvous(buf, group_name))

    def dest(self, slot: int, n: int):
        if not 0 <= slot < self.slots or n * self.hidden > self.slot_elems:
            raise ValueError(f"slot {slot} / {n} rows outside the buffer ({self.slots} x {self.slot_elems})")
        off = slot * self.slot_elems
        return self.buf[off:off + n * self.hidden].view(n, self.hidden)

    def __call__(self, part, slot: int):
        n, H, W, r = part.shape[0], self.hidden, self.world, self.rank
        if n % W:
            raise ValueError(f"{n} rows do not split over {W} ranks")
        c = n // W
        mine = self.dest(slot, n)
        if part.data_ptr() != mine.data_ptr():
            mine.copy_(part)
        off = slot * self.slot_elems
        peers = [p for p in range(W) if p != r]
        remote = {p: self.hdl.get_buffer(p, (n, H), self.dtype, off) for p in peers}
        self.hdl.barrier(channel=0)
        acc = mine[r * c:(r + 1) * c]
        for j, p in enumerate(peers):
            t = self.tmp[j * c:(j + 1) * c]
            t.copy_(remote[p][r * c:(r + 1) * c])
            acc.add_(t)
        self.hdl.barrier(channel=0)
        for p in peers:
            mine[p * c:(p + 1) * c].copy_(remote[p][p * c:(p + 1) * c])
        self.hdl.barrier(channel=0)
        return mine
