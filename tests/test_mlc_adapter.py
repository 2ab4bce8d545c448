"""The MLC adapter's own logic on hand-made chunk sequences, and the skip path (MLC-LLM is not
installable on this project's machines: nothing here runs a real MLC engine)."""
from types import SimpleNamespace as NS

import pytest

from fixtures.mlc_engine import mlc_missing_reason, stream_token_times
from overlap.engine import EngineError
from tests.helpers import ROOT, run_pytest


def text(t):
    return NS(choices=[NS(delta=NS(content=t))], usage=None)


def usage(n, **extra):
    return NS(choices=[], usage=NS(completion_tokens=n, extra=extra))


def test_one_token_per_chunk_is_exact():
    times, extra = stream_token_times([(10, text("a")), (15, text("b")), (22, text("c")),
                                       (23, usage(3, ttft_s=0.001))], 3)
    assert times == [10, 15, 22] and extra == {"ttft_s": 0.001}


def test_empty_and_multi_token_chunks_are_spread_over_the_gaps():
    ev = [(100, text("x")), (105, text("")), (130, text("yz")), (160, text("w")), (161, usage(5))]
    times, _ = stream_token_times(ev, 5)
    # 3 text chunks, 5 tokens: first at 100; 4 later tokens over 2 gaps, 2 per gap, interpolated.
    assert times == [100, 115, 130, 145, 160]
    assert len(times) == 5 and times[-1] == 160


def test_final_usage_only_chunk_is_not_a_token():
    times, _ = stream_token_times([(1, text("a")), (2, text("b")), (3, usage(2))], 2)
    assert times == [1, 2]


def test_stream_that_ends_early_is_an_error():
    with pytest.raises(EngineError, match="without its usage chunk after 2 text chunks"):
        stream_token_times([(1, text("a")), (2, text("b"))], 8)
    with pytest.raises(EngineError, match="produced 2 tokens, expected exactly 8"):
        stream_token_times([(1, text("a")), (2, text("b")), (3, usage(2))], 8)


def test_mlc_benchmarks_skip_with_one_reason_when_mlc_is_missing(tmp_path):
    if mlc_missing_reason() is None:
        pytest.skip("mlc_llm is installed here")
    r = run_pytest(ROOT / "benchmarks", "--engine", "mlc", "--model", "/models/x", "-rs", "--results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "mlc_llm is not installed" in r.stdout and "mlc.ai/wheels" in r.stdout
    assert "MLC-LLM has no overlap mode" in r.stdout
    assert " passed" not in r.stdout.splitlines()[-1]  # nothing ran
