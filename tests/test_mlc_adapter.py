"""The MLC adapter (llm_bench.mlc, llm_bench.mlc_worker): its stream reading and checks on hand-made
chunks, and its engine process driven end to end against tests/fake_mlc, a test double that behaves
as real MLC does where it matters to the measurement (KV pages, admission and preemption, streaming
that drops empty steps, TP from the library, TP workers as TVM starts them). MLC-LLM is not
installable on this project's machines: nothing here runs a real MLC engine."""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from llm_bench.engine import ConfigError, EngineError, Generation
from llm_bench.metrics import MeasurementError, request_timings
from llm_bench.mlc import (
    MLCEngineAdapter,
    build_info,
    check_model_dir,
    check_model_lib,
    check_request,
    mlc_missing_reason,
    read_stream,
)
from tests.helpers import ROOT, alive, proc_stat, run_pytest


# -- the stream, record by record --------------------------------------------------------------------------
def chunk(text, finish=None):
    return NS(choices=[NS(index=0, text=text, finish_reason=finish)], usage=None)


def usage(n, prompt=4, **extra):
    return NS(choices=[], usage=NS(prompt_tokens=prompt, completion_tokens=n,
                                   extra={"prefill_tokens": prompt, **extra}))


def test_a_chunk_carries_tokens_when_it_has_text_or_finishes():
    rec = read_stream([(10, chunk("a")), (15, chunk("")), (22, chunk("bc")), (30, chunk("", "length")),
                       (31, usage(5, ttft_s=0.001))])
    assert rec["chunks_ns"] == [10, 22, 30] and rec["finish_reason"] == "length"
    assert rec["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "extra": {"prefill_tokens": 4, "ttft_s": 0.001}}
    chat = NS(choices=[NS(delta=NS(content="x"), finish_reason=None)], usage=None)
    assert read_stream([(1, chat), (2, usage(1))])["chunks_ns"] == [1]


def test_a_round_that_is_not_one_measured_batch_fails_with_its_reason():
    def rec(n=3, chunks=(1, 2, 3), prompt=4, finish="length", **extra):
        return read_stream([(t, chunk("x")) for t in chunks[:-1]] + [(chunks[-1], chunk("x", finish)),
                                                                     (9, usage(n, prompt=prompt, **extra))])
    assert check_request(rec(), 0, 4, 3) == 3
    with pytest.raises(EngineError, match="request 1: the stream ended without its usage chunk after 2 chunks"):
        check_request(read_stream([(1, chunk("a")), (2, chunk("b"))]), 1, 4, 8)
    with pytest.raises(EngineError, match="produced 3 tokens .* expected exactly 8"):
        check_request(rec(), 0, 4, 8)
    with pytest.raises(EngineError, match="did not end with a 'length' finish chunk .finish reason None"):
        check_request(rec(finish=None), 0, 4, 3)
    with pytest.raises(EngineError, match="4 chunks for 3 tokens"):
        check_request(rec(chunks=(1, 2, 3, 4)), 0, 4, 3)
    with pytest.raises(EngineError, match="request 2: MLC preempted it .prefilled 10 tokens for a 4-token prompt"):
        check_request(rec(prefill_tokens=10), 2, 4, 3)
    bare = rec()
    del bare["usage"]["extra"]["prefill_tokens"]
    with pytest.raises(EngineError, match="cannot tell whether MLC preempted it"):
        check_request(bare, 0, 4, 3)


def test_itl_is_per_chunk_and_tpot_counts_every_token():
    # 5 tokens in 3 chunks (the middle chunk carried 3): two ITLs of 30 ms, TPOT (60 ms) / 4 tokens.
    r = request_timings(0, [10_000_000, 40_000_000, 70_000_000], n_out=5)
    assert r["itl_ms"] == [30.0, 30.0] and r["n_out"] == 5 and r["tpot_ms"] == 15.0 and r["ttft_ms"] == 10.0
    assert request_timings(0, [1, 2, 3])["n_out"] == 3  # one token per arrival (the built-in engine)
    with pytest.raises(MeasurementError, match="3 arrivals for 2 tokens"):
        request_timings(0, [1, 2, 3], n_out=2)


def test_one_library_path_serves_one_tp_size(tmp_path):
    for tp in (1, 2):
        write_library(tmp_path / f"lib-tp{tp}.so", tp)
    assert check_model_lib(None, [1, 2, 4]) is None  # MLC compiles one per TP size
    assert check_model_lib(f"{tmp_path}/lib-tp{{tp}}.so", [1, 2]) is None
    assert check_model_lib(f"{tmp_path}/lib-tp1.so", [2, 2]) is None
    assert "put {tp} in the path" in check_model_lib("/m/lib.so", [1, 2])
    assert "only '{tp}' may stand in braces" in check_model_lib("/m/lib-{n}.so", [1])


def test_each_tp_sizes_library_must_be_a_file(tmp_path):
    """Found when the options are read, not as each engine starts."""
    write_library(tmp_path / "lib-tp2.so", 2)
    assert check_model_lib(f"{tmp_path}/lib-tp{{tp}}.so", [2, 4]) == f"{tmp_path}/lib-tp4.so (TP=4) is not a file"
    assert check_model_lib(f"{tmp_path}/lib.so", [1]) == f"{tmp_path}/lib.so (TP=1) is not a file"


def test_an_hf_id_needs_a_repository():
    assert check_model_dir("HF://mlc-ai/Llama-3-8B-Instruct-q4f16_1-MLC") is None
    for empty in ("HF://", "HF:///", "HF:// "):
        assert check_model_dir(empty).startswith("an HF:// id names a Hugging Face repository after the prefix")


@pytest.mark.parametrize("args,missing", [
    (["--llm-tp-sizes", "2"], 1),  # the baseline runs TP=1
    (["--llm-tp-sizes", "2", "4", "-k", "test_tensor_parallel"], 4),
    (["--llm-tp-sizes", "2", "-k", "test_tensor_parallel"], None),  # no TP=1 benchmark is left to need one
], ids=["baseline-tp1", "tp4", "tp1-deselected"])
def test_the_libraries_of_the_tp_sizes_that_run_are_checked_before_anything_runs(tmp_path, args, missing):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mlc-chat-config.json").write_text("{}")
    write_library(tmp_path / "lib-tp2.so", 2)
    pattern = f"{tmp_path}/lib-tp{{tp}}.so"
    r = run_pytest(ROOT / "benchmarks", "--co", "-q", "--llm-engine", "mlc", "--llm-model", tmp_path / "model",
                   "--llm-model-lib", pattern, "--llm-results-dir", tmp_path / "results", *args)
    if missing is None:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    lib = f"{tmp_path}/lib-tp{missing}.so"
    assert r.stderr.strip() == f"ERROR: --llm-model-lib {pattern}: {lib} (TP={missing}) is not a file"


def test_mlc_columns_are_every_rounds_mean_and_the_build_is_kept():
    from fixtures.measure import engine_columns

    gens = [Generation(tokens=[[-1] * 2], submit_ns=0, token_ns=[5, 9], info={"mlc_ttft_ms": v}) for v in (1.0, 3.0)]
    gens[0].info["mlc_decode_tok_per_s_per_request"] = 100.0  # a key only some rounds have
    e = engine_columns(gens, {"mlc_build": "mlc_llm 0.1.dev0; git abc", "tp": 2}, [1.0, 1.0])
    assert e["mlc_ttft_ms"] == 2.0 and e["mlc_decode_tok_per_s_per_request"] == 100.0
    assert e["mlc_build"] == "mlc_llm 0.1.dev0; git abc" and "tp" not in e


# -- the build that runs -------------------------------------------------------------------------------------
def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_the_build_names_a_source_checkouts_commit_and_no_other_repositorys(tmp_path):
    checkout = tmp_path / "mlc-llm"
    pkg = checkout / "python" / "mlc_llm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _git("init", "-q", cwd=checkout)
    _git("add", ".", cwd=checkout)
    _git("commit", "-q", "-m", "x", cwd=checkout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], check=True, cwd=checkout, capture_output=True,
                          text=True).stdout.strip()
    assert build_info(NS(__version__="0.1.dev0", __file__=str(pkg / "__init__.py"))).startswith(
        f"mlc_llm 0.1.dev0; git {head}")
    (pkg / "__init__.py").write_text("# changed")
    assert f"git {head}+dirty" in build_info(NS(__version__="0.1.dev0", __file__=str(pkg / "__init__.py")))
    elsewhere = checkout / ".venv" / "site-packages" / "mlc_llm"  # installed inside some repository
    elsewhere.mkdir(parents=True)
    assert "git" not in build_info(NS(__version__="0.1.dev0", __file__=str(elsewhere / "__init__.py")))


# -- end to end against the test double ------------------------------------------------------------------------
COMMIT = "79d603f085f50500e9509fa01785ffa7ecfaaa93"


def write_library(path, tp, context_window_size=-1):
    """A fake compiled library: the metadata `mlc_llm compile` records, as JSON."""
    path.write_text(json.dumps({"model_type": "llama", "quantization": "q0f16", "tensor_parallel_shards": tp,
                                "pipeline_parallel_stages": 1, "context_window_size": context_window_size,
                                "prefill_chunk_size": 4096, "max_batch_size": 128}))
    return path


@pytest.fixture
def fake_mlc(monkeypatch, tmp_path):
    """`mlc_llm` resolves to the test double here and in the engine process (through PYTHONPATH), as
    installed from a nightly wheel built at COMMIT; a model directory; MLC's cache in tmp_path."""
    site = tmp_path / "site"
    info = site / "mlc_llm_nightly_fake-0.26.dev4.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlc-llm-nightly-fake\nVersion: 0.26.dev4\n")
    (info / "top_level.txt").write_text("mlc_llm\n")
    (info / "direct_url.json").write_text(json.dumps({"url": "https://github.com/mlc-ai/mlc-llm",
                                                      "vcs_info": {"vcs": "git", "commit_id": COMMIT}}))
    paths = [str(ROOT / "tests" / "fake_mlc"), str(site)]
    for p in reversed(paths):
        monkeypatch.syspath_prepend(p)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("MLC_LLM_HOME", str(tmp_path / "mlc-home"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "mlc-chat-config.json").write_text(json.dumps({"vocab_size": 777, "context_window_size": 4096,
                                                            "prefill_chunk_size": 4096}))
    yield model
    for name in [m for m in sys.modules if m == "mlc_llm" or m.startswith("mlc_llm.")]:
        del sys.modules[name]


@pytest.fixture
def no_strays():
    """Pids (descendants of engine processes) a test registers; any still alive at its end is killed,
    so a failing test leaves nothing behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    children = {}
    for e in os.listdir("/proc"):
        st = proc_stat(e) if e.isdigit() else None
        if st is not None and st[0] != "Z":
            children.setdefault(int(st[1]), []).append(int(e))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _adapter(model, tmp_path, tp=1, lib_tp=None, max_batch=3, max_seq=24, timeout_s=60, **kw):
    lib = tmp_path / "lib-tp{tp}.so"
    write_library(tmp_path / f"lib-tp{tp}.so", tp if lib_tp is None else lib_tp)
    return MLCEngineAdapter(model=str(model), tp=tp, model_lib=str(lib), max_batch=max_batch, max_seq=max_seq,
                            timeout_s=timeout_s, trace_dir=str(tmp_path / "traces"), **kw)


def _trace(tmp_path, tp):
    return json.loads((tmp_path / "traces" / f"mlc-tp{tp}.json").read_text())


def _run_double(model, lib, batch, prompt, max_tokens, wait_s=60, **cfg):
    """The test double in this process: `batch` requests through it; their chunks (None if they did
    not finish within `wait_s`), its trace, the engine and the worker processes it started (ended
    here: their pipes are closed)."""
    import asyncio

    from mlc_llm import AsyncMLCEngine
    from mlc_llm.serve import EngineConfig

    eng = AsyncMLCEngine(str(model), "cuda:0", model_lib=str(lib), mode="server", enable_tracing=True,
                         engine_config=EngineConfig(prefix_cache_mode="disable", **cfg))
    workers = [w[0] for w in eng._workers]

    async def one():
        stream = await eng.completions.create(prompt=[1] * prompt, max_tokens=max_tokens, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"debug_config": {"ignore_eos": True}})
        return [c async for c in stream]

    async def run():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(batch))), wait_s)
        except TimeoutError:
            return None
    try:
        return asyncio.run(run()), json.loads(eng.state.trace_recorder.dump_json()), eng, workers
    finally:
        for proc, _, write_end in eng._workers:
            os.close(write_end)
            proc.wait(timeout=10)


def test_the_double_behaves_as_mlc_where_it_matters(fake_mlc, tmp_path):
    """The double against facts read from MLC: the library's TP decides (EngineConfig's is ignored and
    not echoed); 16 requests of 128 + 128 tokens in a cache of 16 x 256 tokens (257 pages): before
    decode step 114 the 16 sequences hold 15 pages each, one free page per sequence no longer fits,
    so the last request is preempted and prefilled again (128 prompt + 114 generated + 128 = 370),
    still 128 tokens; a request needs 8 tokens of headroom per sequence to be admitted at all."""
    lib = write_library(tmp_path / "lib.so", 2)
    chunks, trace, eng, workers = _run_double(fake_mlc, lib, 16, 128, 128, tensor_parallel_shards=1,
                                              max_num_sequence=16, max_total_sequence_length=16 * 256)
    extras = [c[-1].usage.extra for c in chunks]
    finish = [c[-2].choices[0] for c in chunks]  # the finishing step is sent even with empty text
    assert {f.finish_reason for f in finish} == {"length"} and {bool(f.text) for f in finish} == {True, False}
    assert all(len(c) - 1 < 128 for c in chunks)  # steps with empty text were not sent
    assert len(workers) == 1 and eng.engine_config.tensor_parallel_shards is None
    assert sorted(e["prefill_tokens"] for e in extras) == [128] * 15 + [370]
    assert {e["completion_tokens"] for e in extras} == {128}
    assert [e["tid"] for e in trace if e["name"] == "preempt (0)"] == ["cmpl-16"]
    for e in extras:
        assert {"ttft_s", "end_to_end_latency_s", "inter_token_latency_s", "prefill_tokens_per_s",
                "decode_tokens_per_s", "decode_tokens"} <= set(e)
    # The boundary: 64 tokens are 5 pages; two sequences of 17 tokens hold 4, so one page is free for two
    # sequences before decode step 2: the second request is preempted, then prefilled with 16 + 2 tokens.
    chunks, _, _, _ = _run_double(fake_mlc, lib, 2, 16, 3, max_num_sequence=2, max_total_sequence_length=64)
    assert sorted(c[-1].usage.extra["prefill_tokens"] for c in chunks) == [16, 34]
    # Admission keeps a page free per sequence: with 3 pages, two 1-token prompts (a page each, 2 + 2 > 3)
    # run one after the other: 3 steps each (prefill, 2 decodes) instead of 3 together.
    _, _, eng, _ = _run_double(fake_mlc, lib, 2, 1, 3, max_num_sequence=2, max_total_sequence_length=32)
    assert eng._sched.steps == 6
    chunks, _, _, _ = _run_double(fake_mlc, lib, 1, 16, 1, max_num_sequence=1, max_total_sequence_length=24)
    extra = chunks[0][-1].usage.extra
    assert "decode_tokens_per_s" not in extra and extra["decode_tokens"] == 0  # no decode step
    chunks, _, eng, _ = _run_double(fake_mlc, lib, 1, 16, 4, wait_s=1, max_num_sequence=1,
                                    max_total_sequence_length=20)
    assert chunks is None and eng._sched.steps == 0 and len(eng._sched.waiting) == 1  # 16 + 8 > 20: never admitted


def test_adapter_end_to_end_at_tp2(fake_mlc, tmp_path, no_strays):
    eng = _adapter(fake_mlc, tmp_path, tp=2, enable_trace=True)
    try:
        workers = descendants(eng.procs.pids[0])
        no_strays += workers
        assert len(workers) == 1  # TVM starts TP - 1 workers; worker 0 is the engine process
        d = eng.describe()
        assert (d["mlc_llm_version"], d["vocab_size"], d["tp"], d["mlc_library_tp"]) == ("0.1.dev0", 777, 2, 2)
        assert d["mlc_build"] == f"mlc_llm 0.1.dev0; mlc-llm-nightly-fake 0.26.dev4; git {COMMIT}"
        for part in ("prefix_cache_mode='disable'", "lib-tp2.so", "max_num_sequence=3", "mode='server'",
                     "tensor_parallel_shards=None"):  # MLC's resolved config does not echo TP
            assert part in d["mlc_engine_config"]
        os.kill(eng.procs.pids[0], signal.SIGINT)  # Ctrl-C is the parent's to handle: the engine ignores it
        g = eng.generate([[1, 2, 3, 4]] * 3, 8)
        assert [len(t) for t in g.tokens] == [8, 8, 8]
        for ts in g.times_per_request():
            assert 1 <= len(ts) <= 8 and ts == sorted(ts) and ts[0] >= g.submit_ns
        i = g.info
        assert i["mlc_ttft_ms"] > 0 and i["mlc_e2e_ms"] > 0 and i["mlc_decode_tok_per_s_per_request"] > 0
        assert i["mlc_tokens_per_chunk"] == 24 / sum(len(t) for t in g.times_per_request())
        with pytest.raises(EngineError, match="no comm-free variant"):
            eng.generate([[1]], 2, comm_free=True)
    finally:
        eng.close()
    assert not alive(eng.procs.pids[0]) and not any(alive(p) for p in workers)
    names = {e["name"].rsplit(" (", 1)[0] for e in _trace(tmp_path, 2)}
    assert {"prefill", "decode", "yield final usage"} <= names and "preempt" not in names


def test_fix1_batch_16_runs_without_preemption(fake_mlc, tmp_path):
    """128 + 128 tokens at batch 16: with the cache sized batch x 256 tokens MLC would preempt one
    request near token 114 and finish it after the others, the round still 128 tokens each."""
    eng = _adapter(fake_mlc, tmp_path, max_batch=16, max_seq=256, enable_trace=True)
    try:
        g = eng.generate([[7] * 128] * 16, 128)
        assert [len(t) for t in g.tokens] == [128] * 16
    finally:
        eng.close()
    assert not [e for e in _trace(tmp_path, 1) if e["name"].startswith("preempt")]


def test_fix1_batch_1_below_8_tokens_is_admitted(fake_mlc, tmp_path):
    """MLC admits a request only if prompt + 8 tokens per sequence fit the cache: at batch 1 with
    4 output tokens a cache of prompt + 4 tokens never admits it (the round would time out)."""
    eng = _adapter(fake_mlc, tmp_path, max_batch=1, max_seq=20, timeout_s=20)
    try:
        g = eng.generate([[1] * 16], 4)
        assert len(g.tokens[0]) == 4
    finally:
        eng.close()


def test_fix1_a_preempted_request_fails_the_round_and_keeps_the_engine(fake_mlc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MLC_KV_PAGES", "5")  # 3 sequences of 24 tokens need 6 pages and 3 free
    eng = _adapter(fake_mlc, tmp_path)
    try:
        with pytest.raises(EngineError, match=r"request \d: MLC preempted it"):
            eng.generate([[1] * 12] * 3, 12)
        assert eng.dead is None  # the engine is fine; the round is not a measurement
    finally:
        eng.close()


def test_fix2_itl_is_stored_per_chunk(fake_mlc, tmp_path):
    """Steps with empty text are not sent, so some chunks carry several tokens: the stored ITLs are
    the gaps between chunks as they arrived, never tokens spread over them."""
    from fixtures.measure import _timings

    eng = _adapter(fake_mlc, tmp_path, max_seq=40)
    try:
        g = eng.generate([[1] * 8] * 3, 32)
    finally:
        eng.close()
    times = g.times_per_request()
    assert any(len(ts) < 32 for ts in times)  # FAKE_MLC_EMPTY_TEXT_SHARE 0.3: some steps were not sent
    for ts, r in zip(times, _timings([g])[0]):
        assert r["n_out"] == 32 and r["itl_ms"] == (np.diff(ts) / 1e6).tolist()
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 31)
    assert g.info["mlc_chunks_per_request"] == np.mean([len(ts) for ts in times])


def test_fix3_a_library_of_another_tp_size_is_refused(fake_mlc, tmp_path):
    with pytest.raises(ConfigError, match=r"lib-tp2.so was compiled with tensor_parallel_shards=1, this "
                                          r"benchmark is TP=2"):
        _adapter(fake_mlc, tmp_path, tp=2, lib_tp=1).close()


def test_fix3_one_library_for_several_tp_sizes_is_a_usage_error(fake_mlc, tmp_path):
    write_library(tmp_path / "lib.so", 1)
    r = run_pytest(ROOT / "benchmarks", "--llm-engine", "mlc", "--llm-model", fake_mlc, "--llm-model-lib",
                   tmp_path / "lib.so", "--llm-tp-sizes", "1", "2", "--llm-results-dir", tmp_path / "results")
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--llm-model-lib" in r.stderr and "put {tp} in the path" in r.stderr


def test_a_missing_library_and_a_model_that_is_no_mlc_folder_are_refused(fake_mlc, tmp_path):
    with pytest.raises(ConfigError, match=r"lib-tp4.so \(TP=4\) is not a file"):
        MLCEngineAdapter(model=str(fake_mlc), tp=4, model_lib=str(tmp_path / "lib-tp{tp}.so"), max_batch=1, max_seq=8)
    r = run_pytest(ROOT / "benchmarks", "--llm-engine", "mlc", "--llm-results-dir", tmp_path / "results")
    assert r.returncode == 4 and "--llm-model llama3-8b: is not a directory (a preset name" in r.stderr, r.stderr


def test_without_a_library_mlc_compiles_one_for_the_tp_size(fake_mlc, tmp_path, no_strays):
    eng = MLCEngineAdapter(model=str(fake_mlc), tp=2, model_lib=None, max_batch=2, max_seq=16, timeout_s=60)
    try:
        no_strays += descendants(eng.procs.pids[0])
        assert eng.describe()["mlc_library_tp"] == 2
        assert len(eng.generate([[3, 4]] * 2, 5).tokens[0]) == 5
    finally:
        eng.close()


def test_fix4_a_hung_tp_worker_is_ended_on_close(fake_mlc, tmp_path, monkeypatch, no_strays):
    """TVM starts TP workers with no parent-death signal; one stuck in a collective never sees its
    pipe close and would hold its GPU while the next engine starts."""
    monkeypatch.setenv("FAKE_MLC_WORKER_HANGS", "1")
    eng = _adapter(fake_mlc, tmp_path, tp=4)
    workers = descendants(eng.procs.pids[0])
    no_strays += workers
    assert len(workers) == 3
    eng.close()
    assert not any(alive(p) for p in workers + eng.procs.pids)


def test_fix4_a_hung_engine_and_its_tp_workers_are_ended_on_timeout(fake_mlc, tmp_path, monkeypatch, no_strays):
    monkeypatch.setenv("FAKE_MLC_WORKER_HANGS", "1")
    monkeypatch.setenv("FAKE_MLC_STALL_AT_STEP", "3")
    eng = _adapter(fake_mlc, tmp_path, tp=2, timeout_s=5)
    workers = descendants(eng.procs.pids[0])
    no_strays += workers
    with pytest.raises(EngineError, match=r"no reply to generate within 5 s"):
        eng.generate([[1, 2]] * 2, 8)
    assert eng.dead and not any(alive(p) for p in workers + eng.procs.pids)


def test_engine_process_dying_mid_stream_is_reported(fake_mlc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MLC_EXIT_AT_STEP", "2")
    eng = _adapter(fake_mlc, tmp_path)
    with pytest.raises(EngineError, match=r"MLC engine process 0 \(pid \d+\) died with exit code 3 during generate"):
        eng.generate([[1, 2]], 6)
    assert not alive(eng.procs.pids[0])


def test_mlc_benchmarks_skip_with_one_reason_when_mlc_is_missing(tmp_path):
    if mlc_missing_reason() is None:
        pytest.skip("mlc_llm is installed here")
    model = tmp_path / "model"
    model.mkdir()
    (model / "mlc-chat-config.json").write_text("{}")
    r = run_pytest(ROOT / "benchmarks", "--llm-engine", "mlc", "--llm-model", model, "-rs",
                   "--llm-results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "mlc_llm is not installed" in r.stdout and "mlc.ai/wheels" in r.stdout
    assert "MLC-LLM has no overlap mode" in r.stdout
    assert " passed" not in r.stdout.splitlines()[-1]  # nothing ran
