"""The stream manager: one small object per engine that owns the CUDA streams, events and pinned
buffers the overlap modes use. On CPU there are no streams: every method degrades to running the
same code in program order, so CPU runs check the modes' correctness (prefetch included: its read of
the next weight runs in line, so a prefetch that changed a weight would change the tokens).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from llm_bench.engine import ModeNotApplicable
from llm_bench.options import OVERLAP_MODES as MODES

__all__ = ["MODES", "MODE_PARTS", "ModeNotApplicable", "Schedule", "StreamManager"]
# What each mode switches on; `full` is all of them.
MODE_PARTS = {
    "none": set(),
    "prefetch": {"prefetch"},
    "pipeline": {"pipeline"},
    "double_buffer": {"double_buffer"},
    "full": {"prefetch", "pipeline", "double_buffer"},
}


# Prefetch's default read per all-reduce on CPU, where there is no L2 to fill and no side stream: enough
# to cover every weight of the `tiny` model, cheap beside a step.
CPU_PREFETCH_BYTES = 1 << 20


class StreamManager:
    """Streams (one communication stream shared by the `num_streams` micro-batches, one copy stream,
    one prefetch stream), created once per engine and counted so tests can see that none leak.

    One communication stream, not one per micro-batch: collectives on one communicator run in order
    anyway, and the symmetric-memory all-reduce has a single staging buffer that two streams would race on."""

    created = 0  # streams created in this process, for leak tests

    def __init__(self, device: torch.device, mode: str, num_streams: int = 2,
                 prefetch_bytes: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown overlap mode {mode!r}; choose from {', '.join(MODES)}")
        if num_streams < 2:
            raise ValueError(f"num_streams (micro-batches) must be >= 2, got {num_streams}")
        self.device, self.mode, self.parts = device, mode, MODE_PARTS[mode]
        self.num_streams = num_streams
        self.cuda = device.type == "cuda"
        self.comm_streams: list = []
        self.copy_stream = self.prefetch_stream = None
        if self.cuda:
            if "pipeline" in self.parts:
                self.comm_streams = [self._new()]
            if "prefetch" in self.parts:
                self.copy_stream, self.prefetch_stream = self._new(), self._new()
            default = torch.cuda.get_device_properties(device).L2_cache_size // 2
        else:
            default = CPU_PREFETCH_BYTES
        # Bytes of the next weight read per all-reduce: 0 when the mode does not prefetch.
        self.prefetch_bytes = 0
        if "prefetch" in self.parts:
            self.prefetch_bytes = prefetch_bytes if prefetch_bytes is not None else default
        self._used: list = []  # side streams forked from the current stream since the last join

    def _new(self):
        StreamManager.created += 1
        return torch.cuda.Stream(self.device)

    def close(self) -> None:
        self.comm_streams, self.copy_stream, self.prefetch_stream = [], None, None

    # -- events and streams that are no-ops on CPU --------------------------------------------------
    def event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def wait(self, ev) -> None:
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def on(self, stream):
        if not (self.cuda and stream is not None):
            return contextlib.nullcontext()
        if stream not in self._used:
            self._used.append(stream)
        return torch.cuda.stream(stream)

    def comm_stream(self, i: int):
        """The stream micro-batch `i`'s all-reduce runs on (None: the compute stream, CPU)."""
        return self.comm_streams[0] if self.comm_streams else None

    # -- prefetch: pull the next weight into L2 while an all-reduce runs ---------------------------
    def prefetch(self, weight: torch.Tensor) -> None:
        """Read the first `prefetch_bytes` of `weight` on a side stream, starting now (just before an
        all-reduce), so the GEMM after the all-reduce finds it in L2 (PRESERVE, arXiv 2501.08192).
        On CPU the same read runs in program order: it hides nothing there, but it runs."""
        if self.prefetch_bytes <= 0:
            return
        flat = weight.view(-1)
        n = min(flat.numel(), self.prefetch_bytes // flat.element_size())
        if not self.cuda:
            torch.sum(flat[:n])
            return
        start = self.event()
        with self.on(self.prefetch_stream):
            self.prefetch_stream.wait_event(start)
            torch.sum(flat[:n])  # reads every byte once; the scalar result is discarded

    def join(self) -> None:
        """Make the current stream wait for the side streams this step forked (required before a
        graph capture ends; waiting on a stream the capture never touched would break it)."""
        if not self.cuda:
            return
        cur = torch.cuda.current_stream(self.device)
        for s in self._used:
            cur.wait_stream(s)
        self._used = []

    # -- host-to-device inputs on a copy stream ----------------------------------------------------
    def copy_in(self, dst: torch.Tensor, src_host: torch.Tensor) -> None:
        """Copy step inputs to the device: in-line on the compute stream for `none` (ordered before the
        step, without the host waiting for it: a blocking copy cost two stream syncs per step); from
        pinned memory on the copy stream (compute waits on an event) when prefetch is on. The caller
        rewrites `src_host` only after waiting on something the step produced, so the copy is done."""
        if self.copy_stream is None:
            dst.copy_(src_host, non_blocking=self.cuda)
            return
        cur = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(cur)  # dst is no longer read by earlier work
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src_host, non_blocking=True)
        cur.wait_stream(self.copy_stream)


def _split(n: int, k: int) -> list[tuple[int, int]]:
    k = max(1, min(k, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


@dataclass(frozen=True)
class Schedule:
    """Where a mode's pipelining applies: decode micro-batches from `min_batch` sequences, prefill
    chunks from `min_tokens` prompt tokens (batch x prompt length). Below them micro-batching costs
    more than the communication it hides (each micro-batch re-reads the weights; small chunks' GEMMs
    lose efficiency: NOTES-gpu.md, sixth session), so the step runs whole and `applied` says so."""
    mode: str = "none"
    num_streams: int = 2
    min_batch: int = 2
    min_tokens: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown overlap mode {self.mode!r}; choose from {', '.join(MODES)}")

    @property
    def pipelined(self) -> bool:
        return "pipeline" in MODE_PARTS[self.mode]

    def pipelines_decode(self, batch: int) -> bool:
        return self.pipelined and batch >= max(2, self.min_batch)

    def pipelines_prefill(self, batch: int, prompt_len: int) -> bool:
        return self.pipelined and batch * prompt_len >= self.min_tokens and (batch >= 2 or prompt_len >= 2)

    def decode_chunks(self, batch: int) -> list[tuple[int, int, int, int]]:
        """(b0, b1, s0, s1) ranges of a decode step: micro-batches when pipelining, else the whole batch."""
        if self.pipelines_decode(batch):
            return [(b0, b1, 0, 1) for b0, b1 in _split(batch, self.num_streams)]
        return [(0, batch, 0, 1)]

    def prefill_chunks(self, batch: int, prompt_len: int) -> list[tuple[int, int, int, int]]:
        """Prefill ranges when pipelining: micro-batches for batch >= 2, sequence chunks (ISO style)
        for batch 1; else the whole prompt."""
        if not self.pipelines_prefill(batch, prompt_len):
            return [(0, batch, 0, prompt_len)]
        if batch >= 2:
            return [(b0, b1, 0, prompt_len) for b0, b1 in _split(batch, self.num_streams)]
        return [(0, 1, s0, s1) for s0, s1 in _split(prompt_len, self.num_streams)]

    def applied(self, batch: int, prompt_len: int) -> list[str]:
        """What of the mode runs for this shape (recorded with each result): `pipeline` for decode
        micro-batches, `pipeline-prefill` for prefill chunks, and the mode's other parts."""
        parts = set(MODE_PARTS[self.mode]) - {"pipeline"}
        if self.pipelines_decode(batch):
            parts.add("pipeline")
        if self.pipelines_prefill(batch, prompt_len):
            parts.add("pipeline-prefill")
        return sorted(parts)

    def not_applicable(self, batch: int, prompt_len: int | None = None) -> str | None:
        """Why the mode does nothing at all for this shape (None: some part of it runs). Only
        `pipeline` alone can do nothing; a mode that does nothing is skipped, not run as `none`."""
        if self.mode != "pipeline" or self.pipelines_decode(batch):
            return None
        if prompt_len is not None and self.pipelines_prefill(batch, prompt_len):
            return None
        shape = f"batch {batch}" + (f" x {prompt_len} prompt tokens" if prompt_len is not None else "")
        return (f"pipeline does not apply at {shape}: it splits decode from batch {max(2, self.min_batch)} "
                f"and prefill from {self.min_tokens} tokens (--llm-pipeline-min-batch, "
                f"--llm-pipeline-min-tokens), below which micro-batching costs more than it hides")
