"""Bad input gets a clear error; a crashed or hung rank is reported within the timeout and no
process is left behind."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from llm_bench.engine import EngineError
from overlap.config import ConfigError, EngineConfig, resolve_model
from overlap.engine import TPEngine
from overlap.generate import main as generate_main
from tests.helpers import ROOT, alive, run_pytest


def test_tp_that_does_not_divide_heads():
    with pytest.raises(ConfigError, match=r"TP=3 does not divide num_key_value_heads=4.*1, 2, 4"):
        TPEngine(EngineConfig(model="tiny", tp=3))


def test_llama3_70b_refuses_tp3_without_building():
    with pytest.raises(ConfigError, match="num_key_value_heads=8"):
        resolve_model("llama3-70b").check_tp(3)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model 'llama9'.*tiny"):
        resolve_model("llama9")


def test_checkpoint_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_more_gpus_than_visible():
    with pytest.raises(ConfigError, match=r"TP=2 needs 2 GPUs .* visible"):
        TPEngine(EngineConfig(model="tiny", tp=2, device="cuda"))


def test_prompt_plus_output_longer_than_cache(engine_factory):
    eng = engine_factory(tp=1, max_seq=16)
    with pytest.raises(ConfigError, match=r"prompt \(10\) \+ output \(10\) = 20 tokens do not fit .* 16"):
        eng.generate([[1] * 10], 10)
    assert len(eng.generate([[1] * 10], 6).tokens[0]) == 6  # the engine is still usable


def test_token_ids_outside_the_vocabulary_are_refused(engine_factory):
    """On a GPU such an id is a device-side assert that kills the engine; here it is a clear error."""
    eng = engine_factory(tp=1, max_seq=16)
    vocab = eng.model_config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ConfigError, match=rf"token id {bad} is outside the model's vocabulary \(0..{vocab - 1}\)"):
            eng.generate([[1, bad]], 2)
    with pytest.raises(ConfigError, match="at least one prompt"):
        eng.generate([], 2)
    assert len(eng.generate([[vocab - 1, 0]], 2).tokens[0]) == 2


def test_generate_cli_reports_refusal(capsys):
    assert generate_main(["--model", "tiny", "--tp", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_triton_decode_attention_where_it_cannot_run_is_refused(capsys, monkeypatch):
    """Asked for by name, the Triton kernel is never silently replaced by SDPA; `auto` falls back."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert generate_main(["--model", "tiny", "--decode-attention", "triton", "--max-tokens", "2"]) == 2
    assert capsys.readouterr().err == ("error: --decode-attention triton: Triton kernels need a CUDA device here, "
                                       "not cpu (TRITON_INTERPRET=1 runs them on CPU)\n")
    with TPEngine(EngineConfig(model="tiny", max_seq=8)) as eng:
        assert eng.describe()["decode_attention"] == "sdpa"


CPU_REFUSALS = [
    (["--allreduce", "lamport", "--tp", "2"], "--allreduce lamport: 'lamport' needs CUDA GPUs (symmetric memory); "
     "on CPU the all-reduce is the process group's, gloo (use auto or nccl)"),
    (["--gemv", "triton"], "--gemv triton: Triton kernels need a CUDA device here, not cpu (TRITON_INTERPRET=1 "
     "runs them on CPU)"),
    (["--cuda-graphs"], "--cuda-graphs: CUDA graphs need a CUDA device; the engine runs on cpu"),
    (["--pdl"], "--pdl: programmatic dependent launch needs a CUDA GPU (Hopper or later); the engine runs on cpu"),
    (["--prompt-len", "3000", "--max-tokens", "4"],  # ran, past the positions tiny has (2048)
     "prompt + output = 3004 tokens exceed the max_position_embeddings (2048) of model 'tiny'"),
]


@pytest.mark.parametrize("args,line", CPU_REFUSALS, ids=[" ".join(a) for a, _ in CPU_REFUSALS])
def test_generate_refuses_in_one_line_before_any_rank_starts(capsys, monkeypatch, args, line):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def no_ranks(*a, **kw):
        raise AssertionError("rank processes were started")
    monkeypatch.setattr("overlap.engine.EngineProcesses", no_ranks)
    assert generate_main(["--model", "tiny", *args]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_an_engine_timeout_past_its_range_is_a_usage_error(capsys):
    """1e14 s was accepted and overflowed timedelta in every rank's start-up."""
    with pytest.raises(SystemExit) as e:
        generate_main(["--engine-timeout", "1e14"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("python -m overlap.generate: error: argument --engine-timeout: must be >= 1 "
                                       "and <= 1000000, got '1e14' (--help for usage)\n")
    with pytest.raises(ConfigError, match=r"^--engine-timeout 100000000000000.0: must be >= 1 and <= 1000000$"):
        EngineConfig(engine_timeout=1e14)


def test_compile_defaults_to_on_for_cuda_only():
    assert EngineConfig(device="cpu").resolved().compile is False  # a C++ compiler and minutes on CPU
    assert EngineConfig(device="cuda").resolved().compile is True
    assert EngineConfig(device="cuda", compile=False).resolved().compile is False


def test_killed_rank_mid_generation_is_reported_and_reaped():
    eng = TPEngine(EngineConfig(model="tiny", tp=2, max_seq=1100, engine_timeout=60))
    pids = eng.describe()["pids"]
    err: list = []

    def run():
        try:
            eng.generate([[1, 2, 3, 4]], 1000)
        except EngineError as e:
            err.append(e)
    t = threading.Thread(target=run)
    t0 = time.monotonic()
    t.start()
    time.sleep(1.0)  # let it get into the decode loop
    os.kill(pids[1], signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive(), "generate() did not return after a rank died"
    assert time.monotonic() - t0 < 30
    assert err and "rank 1" in str(err[0]) and "SIGKILL" in str(err[0])
    assert not any(alive(p) for p in pids)
    with pytest.raises(EngineError, match="dead"):
        eng.generate([[1, 2, 3, 4]], 2)


def test_hung_rank_times_out_and_is_reaped():
    eng = TPEngine(EngineConfig(model="tiny", tp=2, max_seq=32, engine_timeout=4))
    pids = eng.describe()["pids"]
    os.kill(pids[1], signal.SIGSTOP)  # alive but making no progress, like a hung collective
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"no reply to generate within 4 s .*hung"):
        eng.generate([[1, 2, 3]], 4)
    assert time.monotonic() - t0 < 20
    assert not any(alive(p) for p in pids)


def test_close_leaves_no_process():
    eng = TPEngine(EngineConfig(model="tiny", tp=2, max_seq=16))
    pids = eng.describe()["pids"]
    eng.close()
    eng.close()  # idempotent
    assert not any(alive(p) for p in pids)


BREAKS_RESULTS = '''
import os

from fixtures.measure import run_generation


def test_a_breaks_the_results_file(llm_bench):
    os.mkdir(llm_bench.results_file)  # after the start-up check: as a folder made read-only mid-run would


def test_b_measures(benchmark, llm_bench):
    run_generation(benchmark, llm_bench, llm_bench.key(1), 1, "t")
'''


def test_a_results_file_broken_mid_run_fails_in_one_line_and_keeps_the_measurement(tmp_path):
    """The append to runs.jsonl was a traceback after the benchmark had measured, which was then
    dropped from the JSON as 'did not measure every round'."""
    (tmp_path / "test_breaks.py").write_text(BREAKS_RESULTS)
    (tmp_path / "conftest.py").write_text("pytest_plugins = ('fixtures.plugin',)\n")
    res, out = tmp_path / "res", tmp_path / "out.json"
    r = run_pytest(tmp_path / "test_breaks.py", "--llm-prompt-len", "4", "--llm-max-tokens", "2", "--llm-num-runs",
                   "2", "--llm-warmup-runs", "0", "--llm-results-dir", res, f"--benchmark-json={out}", cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:]
    why = f"{res / 'runs.jsonl'} could not be written: Is a directory"
    assert f"measured, but {why} (the measurement is in the pytest-benchmark JSON)" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stdout and "IsADirectoryError" not in r.stdout, r.stdout[-3000:]
    assert ("measured, in the pytest-benchmark JSON but not in the live results file: test_b_measures "
            f"({why})") in r.stdout
    assert "not stored (did not measure every round)" not in r.stdout
    (b,) = json.loads(out.read_text())["benchmarks"]
    assert b["name"] == "test_b_measures" and len(b["extra_info"]["ttft_ms_rounds"]) == 2


def test_the_micro_batches_that_ran_are_stored(tmp_path):
    """--llm-num-streams 64 at batch 4 runs 4 micro-batches: stored beside num_streams, as is the
    all-reduce that ran for the one asked for (nccl on CPU is gloo)."""
    out = tmp_path / "run.json"
    r = run_pytest(ROOT / "benchmarks", "-k", "test_overlap", "--llm-overlap-modes", "pipeline", "--llm-batch-sizes",
                   "4", "--llm-num-streams", "64", "--llm-allreduce", "nccl", "--llm-prompt-len", "4",
                   "--llm-max-tokens", "2", "--llm-num-runs", "1", "--llm-warmup-runs", "0",
                   "--llm-results-dir", tmp_path / "res", f"--benchmark-json={out}")
    assert r.returncode == 0, r.stdout[-3000:]
    (b,) = json.loads(out.read_text())["benchmarks"]
    e = b["extra_info"]
    assert (e["num_streams"], e["decode_micro_batches"], e["prefill_chunks"]) == (64, 4, 4)
    assert (e["allreduce"], e["allreduce_requested"]) == ("gloo", "nccl")
