"""The Triton kernels: the fused decode attention (overlap/kernels.py) against the model's own RoPE +
cache write + SDPA, and the batch-1 GEMV (overlap/gemv.py) against `matvec` / `swiglu_up`; on CPU
through Triton's interpreter (fp32: the interpreter has no bfloat16 arithmetic) and on a CUDA GPU
(fp32 and bf16); and inside the engine, the tokens of the torch paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_bench.engine import random_prompts
from overlap.config import PRESETS
from overlap.engine import visible_gpus

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = {**os.environ, "TRITON_INTERPRET": "1"}
# (batch, query heads, KV heads, head dim, cache length, position): tiny's and Llama-3-8B's shapes, a
# non-power-of-two head dim and group (3 query heads per KV head), the first and the last position,
# a position inside the second key block, a long cache (9 blocks of keys: three combine passes).
CASES = [(2, 8, 4, 16, 48, 37), (1, 32, 8, 128, 256, 200), (3, 6, 2, 24, 70, 0), (1, 4, 4, 64, 130, 129),
         (2, 8, 2, 64, 130, 64), (2, 8, 2, 64, 600, 555)]


def _case(c, **kw) -> dict:
    return dict(zip(("B", "H", "KV", "D", "T", "pos"), c), **kw)


def _check_in_interpreter(case: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "tests.kernel_check", json.dumps(case)], cwd=ROOT,
                       env=INTERPRET, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (case, r.stdout + r.stderr[-3000:])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-KV{}-D{}-T{}-pos{}".format(*c))
def test_kernel_matches_the_model_on_cpu(case):
    _check_in_interpreter(_case(case))


def test_kernel_with_other_key_blocks_on_cpu():
    """The block sizes scripts/tune_decode_attention.py sweeps (16 and 128 keys per block)."""
    for block_t in (16, 128):
        _check_in_interpreter(_case((2, 8, 2, 32, 300, 250), block_t=block_t))


def test_engine_tokens_match_sdpa(engine_factory, monkeypatch):
    """TP=2 over gloo, batch 3, and `pipeline` (the kernel on batch slices of the cache): the tokens
    of SDPA decode attention."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the rank processes inherit it
    prompts = random_prompts(3, 5, PRESETS["tiny"].vocab_size, 4)
    want = engine_factory(tp=2, batch_sizes=(3,), max_seq=14, decode_attention="sdpa").generate(prompts, 9).tokens
    for overlap in ("none", "pipeline"):
        eng = engine_factory(tp=2, batch_sizes=(3,), max_seq=14, decode_attention="triton", overlap=overlap)
        assert eng.describe()["decode_attention"] == "triton"
        assert eng.generate(prompts, 9).tokens == want, overlap
        eng.close()


# (rows, columns, swiglu, (BLOCK_N, BLOCK_K, warps) or None for the shape's table entry): whole blocks,
# ragged rows and columns, one row per program, a column block wider than the weight.
GEMV_CASES = [(48, 64, False, (8, 32, 4)), (50, 70, False, (8, 32, 4)), (50, 70, True, (16, 64, 2)),
              (3, 40, False, (1, 128, 1)), (24, 256, True, None)]


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: "n{}-k{}-swiglu{}-{}".format(*c))
def test_gemv_matches_the_model_on_cpu(case):
    n, k, swiglu, cfg = case
    _check_in_interpreter({"gemv": True, "n": n, "k": k, "swiglu": swiglu, "cfg": cfg, "tol": 1e-5})


@pytest.mark.parametrize("d,delta", [(64, True), (100, True), (100, False)])
def test_row_norm_matches_the_model_on_cpu(d, delta):
    _check_in_interpreter({"norm": True, "d": d, "delta": delta, "tol": 1e-5})


def test_engine_tokens_match_torch_gemv(engine_factory, monkeypatch):
    """TP=2 over gloo, batch 1 (the kernel's one-row products in every decode step), in `none` and
    `double_buffer`: the tokens of torch's products."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the rank processes inherit it
    prompts = random_prompts(1, 5, PRESETS["tiny"].vocab_size, 5)
    kw = dict(tp=2, batch_sizes=(1,), max_seq=14, decode_attention="sdpa")
    want = engine_factory(gemv="torch", **kw).generate(prompts, 9).tokens
    for overlap in ("none", "double_buffer"):
        eng = engine_factory(gemv="triton", overlap=overlap, **kw)
        assert eng.describe()["gemv"] == "triton"
        assert eng.generate(prompts, 9).tokens == want, overlap
        eng.close()


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_gemv_matches_the_model_on_gpu(dtype, tol):
    """Llama-3-8B's shapes at TP=1 with their table entries, and the CPU cases; the row norm at 8B's width."""
    from tests.kernel_check import check_gemv, check_norm

    for n, k, swiglu, cfg in [(6144, 4096, False, None), (4096, 14336, False, None), (14336, 4096, True, None),
                              (128256, 4096, False, None), *GEMV_CASES]:
        res = check_gemv(n, k, swiglu, cfg, dtype=dtype, device="cuda")
        assert res["shape_ok"] and res["out"] <= tol, (n, k, swiglu, cfg, res)
    for d, delta in ((4096, True), (4096, False), (100, True)):
        res = check_norm(d, delta, dtype=dtype, device="cuda")
        assert res["shape_ok"] and res["out"] <= tol, (d, delta, res)


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_kernel_matches_the_model_on_gpu(dtype, tol):
    from tests.kernel_check import check

    for c in CASES:
        res = check(**_case(c, dtype=dtype, device="cuda"))
        assert res["untouched_rows_equal"], (c, res)
        assert max(res["out"], res["k_cache"], res["v_cache"]) <= tol, (c, res)
