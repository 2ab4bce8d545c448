"""The MLC adapter's own logic on hand-made chunk sequences, its engine process driven end to end
against tests/fake_mlc (a test double of MLC's API that runs no model), and the skip path. MLC-LLM is
not installable on this project's machines: nothing here runs a real MLC engine."""
import json
import os
import signal
import sys
from types import SimpleNamespace as NS

import pytest

from llm_bench.mlc import MLCEngineAdapter, mlc_missing_reason, stream_token_times
from llm_bench.engine import EngineError
from tests.helpers import ROOT, alive, run_pytest


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
    model = tmp_path / "model"
    model.mkdir()
    (model / "mlc-chat-config.json").write_text("{}")
    r = run_pytest(ROOT / "benchmarks", "--llm-engine", "mlc", "--llm-model", model, "-rs", "--llm-results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "mlc_llm is not installed" in r.stdout and "mlc.ai/wheels" in r.stdout
    assert "MLC-LLM has no overlap mode" in r.stdout
    assert " passed" not in r.stdout.splitlines()[-1]  # nothing ran


@pytest.fixture
def fake_mlc(monkeypatch, tmp_path):
    """`mlc_llm` resolves to the test double here and in the engine process (through PYTHONPATH);
    a model directory whose mlc-chat-config.json gives the vocabulary."""
    fake = str(ROOT / "tests" / "fake_mlc")
    monkeypatch.syspath_prepend(fake)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([fake] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "mlc-chat-config.json").write_text(json.dumps({"vocab_size": 777}))
    yield model
    for name in [m for m in sys.modules if m == "mlc_llm" or m.startswith("mlc_llm.")]:
        del sys.modules[name]


def _adapter(model, tmp_path, **kw):
    return MLCEngineAdapter(model=str(model), tp=2, model_lib=str(tmp_path / "lib-tp{tp}.so"), max_batch=3,
                            max_seq=24, timeout_s=60, trace_dir=str(tmp_path / "traces"), **kw)


@pytest.mark.parametrize("per_chunk", [1, 3])
def test_adapter_end_to_end_against_the_fake_engine(fake_mlc, tmp_path, monkeypatch, per_chunk):
    monkeypatch.setenv("FAKE_MLC_TOKENS_PER_CHUNK", str(per_chunk))
    eng = _adapter(fake_mlc, tmp_path, enable_trace=True)
    try:
        d = eng.describe()
        assert (d["mlc_llm_version"], d["vocab_size"], d["tp"]) == ("0.0.0+fake", 777, 2)
        for part in ("tensor_parallel_shards=2", "prefix_cache_mode='disable'", "lib-tp2.so",
                     "max_num_sequence=3", "mode='server'"):
            assert part in d["mlc_engine_config"]
        os.kill(eng.procs.pids[0], signal.SIGINT)  # Ctrl-C reaches the whole process group: the parent decides
        g = eng.generate([[1, 2, 3, 4]] * 3, 8)
        times = g.times_per_request()
        assert len(times) == 3 and all(len(t) == 8 and t == sorted(t) and t[0] >= g.submit_ns for t in times)
        assert g.info["mlc_ttft_ms"] > 0 and g.info["mlc_decode_tok_per_s"] > 0
        with pytest.raises(EngineError, match="no comm-free variant"):
            eng.generate([[1]], 2, comm_free=True)
    finally:
        eng.close()
    assert not alive(eng.procs.pids[0])
    events = json.loads((tmp_path / "traces" / "mlc-tp2.json").read_text())
    assert len(events) == 3 * -(-8 // per_chunk)  # one fake decode event per chunk sent


def test_engine_process_dying_mid_stream_is_reported(fake_mlc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MLC_EXIT_AFTER_CHUNKS", "2")
    eng = _adapter(fake_mlc, tmp_path)
    with pytest.raises(EngineError, match=r"MLC engine process 0 \(pid \d+\) died with exit code 3 during generate"):
        eng.generate([[1, 2]], 6)
    assert not alive(eng.procs.pids[0])
