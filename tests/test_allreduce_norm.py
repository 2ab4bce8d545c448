"""The Lamport all-reduce (+ residual add + RMSNorm) kernel of overlap/allreduce_norm.py on CPU, in
Triton's interpreter: simulated ranks in one process (tests/allreduce_norm_check.py says how), the
results against torch, the slot rotation and clearing over consecutive calls with changing row
counts, the sentinel's neighbours (+0.0/-0.0 data), a peer that never sends, and the refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from overlap.allreduce_norm import sentinel_bits, unavailable_reason
from overlap.engine import visible_gpus

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = {**os.environ, "TRITON_INTERPRET": "1"}


def _run(case: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.allreduce_norm_check", json.dumps(case)], cwd=ROOT, check=False,
                       env=INTERPRET, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (case, r.stdout + r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("norm", [True, False], ids=["fused", "all_reduce"])
def test_two_ranks_over_consecutive_calls(dtype, norm):
    """Six calls of 3, 1, 1, 2, 3, 1 rows: each rank's row lands in the other's buffer at the slot of
    the call, both ranks get the same bits, the result is torch's (bit for bit in fp32 and fp16), the counter
    rotates, and after every call only the current slot holds data (fewer rows than the call that
    last used a slot still clear all of its rows)."""
    res = _run({"scenario": "protocol", "dtype": dtype, "norm": norm})
    assert res["calls"] >= 4 and res["ok"], res


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_four_ranks_sum_in_rank_order(dtype):
    """Rank 1 of 4, a hidden size that is not a power of two: the fp32 sum in rank order, rounded once."""
    res = _run({"scenario": "wider", "world": 4, "hidden": 40, "rows": 2, "dtype": dtype})
    assert res["ok"], res


def test_a_peer_that_never_sends_is_an_error_not_a_hang():
    res = _run({"scenario": "late_peer"})
    assert res["ok"], res


def test_refusals():
    res = _run({"scenario": "refusals"})
    assert res["ok"], res


def test_unavailable_reasons(monkeypatch):
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in unavailable_reason(cpu, 2, bf16, 4096, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason(cpu, 2, bf16, 4096, 16) is None
    for args, word in [((1, bf16, 4096, 16), "world"), ((9, bf16, 4096, 16), "world"),
                       ((2, torch.float64, 4096, 16), "dtype"), ((2, bf16, 4, 16), "16-byte"),
                       ((2, bf16, 4096, 0), "max_rows"), ((8, torch.float32, 1 << 20, 1024), "64-bit")]:
        why = unavailable_reason(cpu, *args)
        assert why is not None and word in why, (args, why)


def test_sentinel_is_negative_zero():
    for dt, it in [(torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float32, torch.int32)]:
        z = torch.tensor([sentinel_bits(dt)], dtype=it).view(dt)
        assert z.item() == 0 and torch.signbit(z).item(), dt


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_bench_correctness_checks_pass_on_two_gpus():
    """scripts/bench_allreduce.py in a short configuration: its checks (every result against an fp32
    reference, the Lamport results bit-identical on both ranks) must all pass, and the timing runs
    (CUDA graphs, PDL on and off) must finish without a rank timing out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "scripts/bench_allreduce.py", "--tp", "2", "--rows", "1", "3",
                        "--calls", "8", "--replays", "3"], cwd=ROOT, env=env, check=False, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"check"')]
    assert len(checks) == 2 * 5 and all(c["ok"] for c in checks), checks
