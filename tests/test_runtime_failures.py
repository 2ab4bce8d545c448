"""Bad input gets a clear error; a crashed or hung rank is reported within the timeout and no
process is left behind."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from llm_bench.engine import EngineError
from overlap.config import ConfigError, EngineConfig, resolve_model
from overlap.engine import TPEngine
from overlap.generate import main as generate_main
from tests.helpers import alive


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
    assert "decode_attention 'triton' cannot run here" in capsys.readouterr().err
    with TPEngine(EngineConfig(model="tiny", max_seq=8)) as eng:
        assert eng.describe()["decode_attention"] == "sdpa"


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
