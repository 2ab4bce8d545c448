"""Every overlap mode computes `none`'s logits: float32 logits of the prefill's last position and of the
first K decode steps, teacher-forced on `none`'s greedy tokens, through each mode's own schedule and
CUDA graphs (TPEngine.step_logits), at TP=2 and batch 8; and each mode's own greedy tokens are
`none`'s wherever `none`'s top two logits are not within the tolerance of each other.

On CPU (gloo, synchronous) this checks the logits path and the modes' arithmetic. On two GPUs it is
the check that a stream-ordering bug cannot pass: a chunk's sublayer that starts before its
all-reduce has finished reads a half-reduced activation, and `scripts/planted/run.sh` proves that
this file fails with such a bug planted (the pipeline schedule without its wait).

Tolerance, per (step, sequence) row: max |mode - none| <= REL_TOL * max |none|. Micro-batching
changes only GEMM shapes, so only the summation order of fp32 dot products (TF32 off): measured on
CPU with llama3-1b shapes, every product split-K over 4 or 16 moved the logits by 2.8e-6 relative,
100 ulp of noise on every product's output by 8.4e-5. A half-reduced activation, read at one
sublayer on one rank, moved them by 0.06-0.16 (0.14-0.63 for tiny). 1e-3 sits ~10x above the
worst rounding and ~60x below the smallest bug.
"""
from __future__ import annotations

import numpy as np
import pytest

from llm_bench.engine import ConfigError, random_prompts
from overlap.config import EngineConfig, resolve_model
from overlap.engine import TPEngine, visible_gpus
from overlap.streams import MODES

REL_TOL = 1e-3
BATCH, PROMPT, STEPS = 8, 16, 4     # two micro-batches of 4 under pipeline; K = 4 decode steps
OTHER_MODES = [m for m in MODES if m != "none"]
# tiny: a chunk's sublayer is a few short kernels, shorter than an all-reduce, so a compute stream
# that does not wait outruns the communication stream; llama3-1b: the real shapes.
GPU_MODELS = ("tiny", "llama3-1b")


def rel_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per (step, sequence) row: max |got - ref| over the vocabulary / max |ref|."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return np.abs(got - ref).max(-1) / np.abs(ref).max(-1)


def decided(row: np.ndarray) -> bool:
    """Whether greedy sampling of `row` cannot flip under a perturbation within the tolerance."""
    top2 = np.partition(row, -2)[-2:]
    return top2[1] - top2[0] > 2 * REL_TOL * np.abs(row).max()


def token_mismatches(tokens, ref_tokens, ref_logits) -> list[tuple[int, int]]:
    """(sequence, step) where `tokens` differ from `ref_tokens` while `none`'s choice was decided;
    a sequence is compared up to its first undecided step (after it, the inputs may differ)."""
    bad = []
    for j, (got, want) in enumerate(zip(tokens, ref_tokens)):
        for i, (a, b) in enumerate(zip(got, want)):
            if not decided(ref_logits[i, j]):
                break
            if a != b:
                bad.append((j, i))
                break
    return bad


def run(eng: TPEngine, prompts, forced=None):
    """The engine's greedy tokens (STEPS + 1 per sequence, the real generate loop) and its step
    logits [STEPS + 1, BATCH, vocab], teacher-forced on `forced` (default: its own tokens)."""
    tokens = eng.generate(prompts, STEPS + 1).tokens
    forced = forced if forced is not None else [t[:STEPS] for t in tokens]
    return tokens, eng.step_logits(prompts, forced)


def check_mode(make, mode: str, ref: dict) -> str:
    """Build `mode`'s engine with `make`, compare with `none`'s reference; one line of numbers."""
    with make(mode) as eng:
        tokens, logits = run(eng, ref["prompts"], ref["forced"])
    err = rel_errors(logits, ref["logits"])
    step, seq = np.unravel_index(err.argmax(), err.shape)
    line = (f"{mode}: max relative logit error {err.max():.3g} (step {step}, sequence {seq}; "
            f"{int((err > REL_TOL).sum())}/{err.size} rows over {REL_TOL:g})")
    print(line)
    assert err.max() <= REL_TOL, f"{line}; per step: {np.array2string(err.max(1), precision=3)}"
    bad = token_mismatches(tokens, ref["tokens"], ref["logits"])
    assert not bad, f"{mode}: greedy tokens differ from none's at (sequence, step) {bad}"
    return line


def reference(make, vocab: int) -> dict:
    """`none`'s tokens and logits, and a check that its step logits are what its generate samples."""
    prompts = random_prompts(BATCH, PROMPT, vocab, 5)
    with make("none") as eng:
        tokens, logits = run(eng, prompts)
    assert logits.shape == (STEPS + 1, BATCH, vocab) and logits.dtype == np.float32
    wrong = [(j, i) for j, t in enumerate(tokens) for i in range(STEPS + 1)
             if decided(logits[i, j]) and logits[i, j].argmax() != t[i]]
    assert not wrong, f"none: step logits disagree with generate's tokens at (sequence, step) {wrong}"
    return {"prompts": prompts, "tokens": tokens, "logits": logits, "forced": [t[:STEPS] for t in tokens]}


# -- CPU: gloo at TP=2, in every CI run --------------------------------------------------------------
def _cpu(mode: str, **kw) -> TPEngine:
    return TPEngine(EngineConfig(model="tiny", tp=2, overlap=mode, batch_sizes=(BATCH,),
                                 max_seq=PROMPT + STEPS + 1, engine_timeout=120, **kw))


@pytest.fixture(scope="module")
def cpu_reference():
    return reference(_cpu, resolve_model("tiny").vocab_size)


@pytest.mark.parametrize("mode", OTHER_MODES)
def test_mode_gives_the_logits_of_none_cpu(mode, cpu_reference):
    check_mode(_cpu, mode, cpu_reference)


def test_step_logits_are_the_full_forward_logits(cpu_reference):
    """The step logits (prefill graph + teacher-forced decode steps through the KV cache) are the
    logits of one forward pass over prompt + forced tokens (TPEngine.logits, no cache, one chunk)."""
    ref = cpu_reference
    full = [p + f for p, f in zip(ref["prompts"], ref["forced"])]
    with _cpu("none") as eng:
        whole = eng.logits(full)  # [BATCH, PROMPT + STEPS, vocab]
    want = whole[:, PROMPT - 1:].transpose(1, 0, 2)
    assert rel_errors(ref["logits"], want).max() <= REL_TOL


def test_step_logits_refuses_bad_input():
    with _cpu("none") as eng:
        prompts = [[1, 2, 3], [4, 5, 6]]
        with pytest.raises(ConfigError, match="one row per prompt"):
            eng.step_logits(prompts, [[1]])
        with pytest.raises(ConfigError, match="same number of tokens"):
            eng.step_logits(prompts, [[1], [1, 2]])
        with pytest.raises(ConfigError, match="outside the model's vocabulary"):
            eng.step_logits(prompts, [[1], [512]])
        with pytest.raises(ConfigError, match="do not fit the KV cache"):
            eng.step_logits(prompts, [[1] * (PROMPT + STEPS)] * 2)
        with pytest.raises(ConfigError, match="at least one token"):
            eng.step_logits([[], []], [[1], [2]])
        assert eng.step_logits(prompts, [[], []]).shape == (1, 2, 512)  # k = 0: the prefill only


# -- two GPUs: float32, TF32 off, each mode's CUDA graphs and streams ---------------------------------
def _gpu(model: str):
    def make(mode: str) -> TPEngine:
        # compile off: the check is of the streams and events, the same code either way, and five
        # engines per model stay quick to build; fp32 so that rounding is far below the tolerance.
        # Pipelining forced at this small shape (the GPU defaults apply it only where it pays): the
        # check is of its streams and events.
        return TPEngine(EngineConfig(model=model, tp=2, device="cuda", overlap=mode, batch_sizes=(BATCH,),
                                     max_seq=PROMPT + STEPS + 1, dtype="float32", compile=False,
                                     engine_timeout=300, pipeline_min_batch=2, pipeline_min_tokens=1))
    return make


@pytest.fixture(scope="module")
def gpu_references():
    return {}


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("mode", OTHER_MODES)
@pytest.mark.parametrize("model", GPU_MODELS)
def test_mode_gives_the_logits_of_none_gpu(model, mode, gpu_references):
    if model not in gpu_references:
        gpu_references[model] = reference(_gpu(model), resolve_model(model).vocab_size)
    check_mode(_gpu(model), mode, gpu_references[model])
