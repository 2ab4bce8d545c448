"""scripts/bench_prefill_overlap.py on CPU: the copy-engine all-reduce's pull/add/pull algorithm (threads
stand in for ranks, shared CPU buffers for symmetric memory, a thread barrier for the signal-pad
barrier) equals the sum for 2 and 4 ranks and every slot; and the CPU smoke run passes its own
correctness checks (every variant that runs on gloo gives `none`'s output, `none` gives TP=1's)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading

import pytest
import torch

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "bench_prefill_overlap.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_prefill_overlap", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


class _Handle:
    """What the script uses of a symmetric-memory handle, over plain CPU buffers."""

    def __init__(self, bufs, barrier):
        self.bufs, self.barrier_ = bufs, barrier

    def get_buffer(self, peer, sizes, dtype, storage_offset=0):
        n = 1
        for s in sizes:
            n *= s
        return self.bufs[peer][storage_offset:storage_offset + n].view(*sizes)

    def barrier(self, channel=0):
        self.barrier_.wait(timeout=30)


@pytest.mark.parametrize("world", [2, 4])
def test_copy_engine_all_reduce_sums(world):
    mod = _load()
    slots, max_rows, hidden = 3, 16, 8
    bufs = [torch.zeros(slots * max_rows * hidden) for _ in range(world)]
    barrier = threading.Barrier(world)
    ars = [mod.CopyEngineAllReduce(r, world, slots, max_rows, hidden, bufs[r], _Handle(bufs, barrier))
           for r in range(world)]
    g = torch.Generator().manual_seed(0)
    for slot, rows in [(0, 16), (2, 8), (1, 4 * world)]:
        parts = [torch.randn(rows, hidden, generator=g) for _ in range(world)]
        outs, errors = [None] * world, []

        def run(r, slot=slot, rows=rows, parts=parts, outs=outs, errors=errors):
            try:
                dst = ars[r].dest(slot, rows)
                dst.copy_(parts[r])  # the GEMM writes its partial into the slot
                outs[r] = ars[r](dst, slot).clone()
            except Exception as e:  # noqa: BLE001 - re-raised in the test thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        want = torch.stack(parts).sum(0)
        for r in range(world):
            torch.testing.assert_close(outs[r], want, rtol=1e-6, atol=1e-6)


def test_copy_engine_all_reduce_refuses_rows_that_do_not_split():
    mod = _load()
    buf = torch.zeros(2 * 4 * 8)
    ar = mod.CopyEngineAllReduce(0, 2, 2, 4, 8, buf, _Handle([buf, buf], threading.Barrier(1)))
    with pytest.raises(ValueError):
        ar(ar.dest(0, 3), 0)
    with pytest.raises(ValueError):
        ar.dest(2, 4)


def test_cpu_smoke_run_checks_every_variant():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tokens", "64", "--seq-len", "16",
                          "--rounds", "1", "--min-ms", "1"], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by = {r["variant"]: r for r in recs}
    for v in ("none", "pipe2", "pipe4", "sp_nccl"):
        assert by[v]["correct"] is True and by[v]["us_per_layer"] > 0, by[v]
    assert by["none"]["rel_err_vs_tp1"] < 1e-4
    for v in ("pipe2_hp", "pipe2_ce", "sp_async"):
        assert "CPU" in by[v]["skipped"]


def test_cli_errors_are_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--variants", "none,cf,bogus"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "bogus" in out.stderr
