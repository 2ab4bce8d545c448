"""Collectives for tensor parallelism: NCCL (GPU), gloo (CPU), a symmetric-memory one-shot all-reduce
(GPU, low latency for decode-sized messages), a Lamport one-shot fused with the residual add and
RMSNorm that follow it (overlap/allreduce_norm.py), and the comm-free no-op used to measure the
communication share of a step (wrong numbers, same compute: a measurement tool only).

Which path a call takes is decided in one place per kind: `fused_reason` for all-reduce + add +
RMSNorm (each fallback's reason logged once), `ce_reason` for a pipelined chunk's copy-engine path,
and `all_reduce` for the rest (the symmetric-memory one-shot up to SYMM_MAX_BYTES, else NCCL/gloo).
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from llm_bench.options import ALLREDUCE_CHOICES

log = logging.getLogger("overlap.comm")
# One-shot reads every peer's whole buffer: good for decode messages (a few KB..MB), not prefill.
SYMM_MAX_BYTES = 4 << 20
# A pipelined chunk's all-reduce from this size on moves its data by copy engine (ce_allreduce.py).
CE_MIN_BYTES = SYMM_MAX_BYTES


class Comm:
    """All-reduce and sampling collectives of one rank; `free()` turns them into no-ops for a while."""

    def __init__(self, rank: int, world: int, device: torch.device, dtype: torch.dtype,
                 allreduce: str = "auto", hidden: int = 0, max_rows: int = 1, pdl: bool = True,
                 ce_slots: int = 0, ce_rows: int = 0):
        """`allreduce`: nccl (NCCL/gloo only), symm (the symmetric-memory one-shot for messages up to
        SYMM_MAX_BYTES), lamport (symm, plus the fused Lamport all-reduce + add + RMSNorm for up to
        `max_rows` rows of `hidden`), auto (each where it works, else NCCL). Asking for one that
        cannot run here is an error, not a silent fallback. With symmetric memory and `ce_slots`,
        pipelined chunks' large all-reduces (up to `ce_rows` rows) move their data by copy engine."""
        if allreduce not in ALLREDUCE_CHOICES:
            raise ValueError(f"allreduce must be one of {ALLREDUCE_CHOICES}, got {allreduce!r}")
        self.rank, self.world, self.device = rank, world, device
        self.comm_free = False
        self.symm_buf = None
        self.symm_error = None
        self.lamport = None
        self.lamport_error = None
        self.ce = None
        self.ce_error = None
        self.requested = allreduce
        self._logged: set[str] = set()
        if world > 1 and device.type == "cuda" and allreduce in ("symm", "lamport", "auto"):
            try:
                self._init_symm(dtype)
            except Exception as e:  # noqa: BLE001 - the reason is recorded and reported
                self.symm_error = f"{type(e).__name__}: {e}"
                if allreduce != "auto":
                    raise RuntimeError(f"allreduce {allreduce!r} is not available here: {self.symm_error}") from e
        if world > 1 and device.type == "cuda" and allreduce in ("lamport", "auto"):
            self._init_lamport(dtype, hidden, max_rows, pdl, required=allreduce == "lamport")
        if self.symm_buf is not None and ce_slots and ce_rows:
            self._init_ce(dtype, hidden, ce_slots, ce_rows)
        if device.type != "cuda" and allreduce in ("symm", "lamport"):
            raise RuntimeError(f"allreduce {allreduce!r} needs CUDA GPUs (symmetric memory); use nccl or auto")
        if world > 1 and device.type == "cuda":
            self._agree()
        self.backend = ("lamport" if self.lamport is not None else "symm" if self.symm_buf is not None
                        else dist.get_backend() if world > 1 else "none")

    def _init_ce(self, dtype: torch.dtype, hidden: int, slots: int, rows: int) -> None:
        from .ce_allreduce import CopyEngineAllReduce

        rows = -(-rows // self.world) * self.world  # whole shares per rank
        try:
            self.ce = CopyEngineAllReduce.symmetric(self.group_name, self.rank, self.world, slots, rows, hidden,
                                                    dtype, self.device)
        except Exception as e:  # noqa: BLE001 - recorded and reported; pipelined chunks then use NCCL
            self.ce_error = f"{type(e).__name__}: {e}"

    def ce_reason(self, x: torch.Tensor, slot: int) -> str | None:
        """Why this chunk's all-reduce cannot move its data by copy engine (None: it can)."""
        if self.ce is None:
            return self.ce_error or "no copy-engine buffers (needs symmetric memory and pipelined prefill)"
        rows = x.numel() // x.shape[-1]
        if x.numel() * x.element_size() < CE_MIN_BYTES:
            return f"{x.numel() * x.element_size()} bytes: below {CE_MIN_BYTES} the one-shot's latency wins"
        if rows % self.world or x.shape[-1] != self.ce.hidden or rows * x.shape[-1] > self.ce.slot_elems \
                or not 0 <= slot < self.ce.slots or x.dtype != self.ce.dtype:
            return f"{rows} rows of {x.shape[-1]} {x.dtype} in slot {slot} do not fit the copy-engine buffers"
        return None

    def _agree(self) -> None:
        """Every rank takes the same paths (a rank alone in a one-shot or Lamport kernel would wait
        forever): a path one rank could not build is dropped on all."""
        have = torch.tensor([self.symm_buf is not None, self.lamport is not None, self.ce is not None],
                            dtype=torch.int32, device=self.device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if self.ce is not None and not have[2]:
            self.ce, self.ce_error = None, self.ce_error or "another rank could not build it"
        if self.symm_buf is not None and not have[0]:
            self.symm_buf, self.symm_error = None, self.symm_error or "another rank could not build it"
        if self.lamport is not None and not have[1]:
            self.lamport, self.lamport_error = None, self.lamport_error or "another rank could not build it"

    def _init_lamport(self, dtype: torch.dtype, hidden: int, max_rows: int, pdl: bool, required: bool) -> None:
        from .allreduce_norm import LamportAllReduce, unavailable_reason

        why = unavailable_reason(self.device, self.world, dtype, hidden, max_rows)
        try:
            if why:
                raise RuntimeError(why)
            self.lamport = LamportAllReduce(self.rank, self.world, self.device, dtype, hidden, max_rows,
                                            dist.group.WORLD.group_name, pdl=pdl)
        except Exception as e:  # noqa: BLE001 - recorded, reported, and an error when it was asked for
            self.lamport_error = f"{type(e).__name__}: {e}"
            if required:
                raise RuntimeError(f"allreduce 'lamport' is not available here: {self.lamport_error}") from e

    def fused_reason(self, part: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor) -> str | None:
        """Why this all-reduce and the add+RMSNorm after it cannot be one Lamport kernel (None: they
        can). Each reason the caller falls back for is logged once (rank 0)."""
        if self.comm_free or self.world == 1 or self.lamport is None:
            return "no communication" if self.comm_free or self.world == 1 else \
                self.lamport_error or f"allreduce is {self.requested!r}"
        why = self.lamport.why_not(part, x, norm_w)
        if why and why not in self._logged and self.rank == 0:
            self._logged.add(why)
            log.info("all-reduce + RMSNorm not fused: %s", why)
        return why

    def all_reduce_add_norm(self, part: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + all-reduced `part`, RMSNorm of that * norm_w) in one Lamport kernel; only where
        `fused_reason` is None."""
        return self.lamport.all_reduce_add_rms_norm(part, x, norm_w, eps)

    @contextlib.contextmanager
    def free(self, on: bool = True):
        """Within: collectives are no-ops (wrong numbers, same compute), when `on`. The comm-free
        variant of a step is built and run inside this; the previous state comes back on exit,
        an exception included."""
        before = self.comm_free
        self.comm_free = on
        try:
            yield
        finally:
            self.comm_free = before

    def _init_symm(self, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group_name = dist.group.WORLD.group_name
        buf = symm_mem.empty(SYMM_MAX_BYTES // dtype.itemsize, device=self.device, dtype=dtype)
        symm_mem.rendezvous(buf, group_name)
        self.group_name = group_name
        self.symm_buf = buf
        self.one_shot = torch.ops.symm_mem.one_shot_all_reduce_out
        # Check it once against NCCL before trusting it.
        x = torch.full((1024,), float(self.rank + 1), device=self.device, dtype=dtype)
        out = torch.empty_like(x)
        self._symm(x, out)
        torch.cuda.synchronize(self.device)
        want = self.world * (self.world + 1) / 2
        if not torch.all(out == want):
            raise RuntimeError(f"symmetric-memory all-reduce gave {out[0].item()}, expected {want}")

    def _symm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n = x.numel()
        self.symm_buf[:n].copy_(x.reshape(-1))
        self.one_shot(self.symm_buf[:n], "sum", self.group_name, out.view(-1))

    def all_reduce(self, x: torch.Tensor, slot: int | None = None) -> torch.Tensor:
        """Sum `x` over ranks; returns the result (in place for NCCL/gloo). `slot`: the pipeline
        chunk it belongs to, whose large all-reduce may run by copy engine (ce_reason)."""
        if self.world == 1 or self.comm_free:
            return x
        if slot is not None and self.ce_reason(x, slot) is None:
            rows = x.numel() // x.shape[-1]
            return self.ce(x.reshape(rows, x.shape[-1]), slot).view(x.shape)
        if self.symm_buf is not None and x.numel() * x.element_size() <= SYMM_MAX_BYTES:
            x = x.contiguous()  # `out` must be contiguous too: the kernel writes through out.view(-1)
            out = torch.empty_like(x)
            self._symm(x, out)
            return out
        dist.all_reduce(x)
        return x

    def argmax(self, val: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Greedy token over a vocab-sharded LM head from each rank's (max logit, global index) per
        row: gathering the pairs instead of the whole logits. Ties go to the lowest index, as
        torch.argmax does on the full logits."""
        if self.world == 1 or self.comm_free:
            return idx
        mine = torch.stack([val, idx.float()], dim=-1)  # index < 2**24 is exact in fp32
        allv = torch.empty((self.world * mine.shape[0], 2), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(allv, mine.contiguous())
        allv = allv.view(self.world, -1, 2)
        best = allv[..., 0].argmax(dim=0)  # first max = lowest rank = lowest index
        return allv[..., 1].gather(0, best.unsqueeze(0)).squeeze(0).long()

    def gather_logits(self, logits_local: torch.Tensor) -> torch.Tensor:
        """Full logits on every rank (for correctness tests, not the decode path)."""
        if self.world == 1:
            return logits_local
        parts = [torch.empty_like(logits_local) for _ in range(self.world)]
        dist.all_gather(parts, logits_local.contiguous())
        return torch.cat(parts, dim=-1)
