"""Bad input is refused where it enters, in one line, before anything runs: option values out of
range, a model that does not exist or cannot serve the lengths asked for, an unwritable results
folder, pytest-benchmark options that mean nothing here or would change what is measured (naming
ours), and bad checkpoints (the file and the field). And what is honoured instead of refused:
--benchmark-min-rounds, a --llm-max-tokens 1 row that says why it has no TPOT, another plugin's
--device beside ours."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from llm_bench.engine import ConfigError
from overlap.config import EngineConfig, ModelConfig, from_hf_config, weight_names, weight_shape
from overlap.engine import TPEngine
from overlap.model import WeightSource
from tests.helpers import ROOT, run_pytest

# -- pytest options ----------------------------------------------------------------------------------
PRESETS = "tiny, llama3-1b, llama3-8b, llama3-70b"
REFUSED = [
    (["--llm-max-tokens", "0"], "error: argument --llm-max-tokens/--max-tokens: must be >= 1, got '0'"),
    (["--max-tokens", "0"], "error: argument --llm-max-tokens/--max-tokens: must be >= 1, got '0'"),
    (["--llm-prompt-len", "0"], "error: argument --llm-prompt-len: must be >= 1, got '0'"),
    (["--llm-num-runs", "0"], "error: argument --llm-num-runs/--num-runs: must be >= 1 and <= 100000, got '0'"),
    (["--llm-warmup-runs", "-1"],
     "error: argument --llm-warmup-runs/--warmup-runs: must be >= 0 and <= 100000, got '-1'"),
    (["--llm-batch-sizes", "1", "0"], "error: argument --llm-batch-sizes: must be >= 1 and <= 4096, got '0'"),
    (["--llm-max-tokens", "two"],
     "error: argument --llm-max-tokens/--max-tokens: expected an integer (>= 1), got 'two'"),
    (["--llm-engine-timeout", "0"], "error: argument --llm-engine-timeout: must be >= 1 and <= 1000000, got '0'"),
    (["--llm-engine-timeout", "0.0001"],  # was accepted: the run failed with "no reply ... within 0 s"
     "error: argument --llm-engine-timeout: must be >= 1 and <= 1000000, got '0.0001'"),
    (["--llm-engine-timeout", "-3"], "error: argument --llm-engine-timeout: must be >= 1 and <= 1000000, got '-3'"),
    (["--llm-engine-timeout", "1e14"],  # was an OverflowError in every rank's start-up
     "error: argument --llm-engine-timeout: must be >= 1 and <= 1000000, got '1e14'"),
    (["--llm-pipeline-min-batch", "1"],  # integer bounds exactly, not 1.04858e+06
     "error: argument --llm-pipeline-min-batch: must be >= 2 and <= 1048576, got '1'"),
    (["--llm-seed", "-1"], "error: argument --llm-seed: must be >= 0 and <= 9223372036854775807, got '-1'"),
    (["--llm-model-lib", "/x/lib.so"], "ERROR: --llm-model-lib /x/lib.so: a compiled library is for --llm-engine "
     "mlc; the builtin engine would ignore it"),
    (["--llm-engine", "mlc", "--llm-model", "HF://a/b", "--llm-allreduce", "lamport", "--llm-gemv", "torch",
      "--llm-seed", "3", "--llm-engine-timeout", "60"],  # the seed (prompts) and timeout serve MLC runs too
     "ERROR: --llm-allreduce, --llm-gemv: an option of the built-in engine; --llm-engine mlc does not read it "
     "(MLC's own settings are in its compiled library and mlc-chat-config.json)"),
    (["--llm-model", "tiny/"], "ERROR: --llm-model tiny/: model 'tiny/' is not a directory (presets are named "
     f"without a path: {PRESETS})"),
    (["--llm-model", "./tiny"], "ERROR: --llm-model ./tiny: model './tiny' is not a directory (presets are named "
     f"without a path: {PRESETS})"),
    (["--llm-engine", "mlc", "--llm-model", "HF://"], "ERROR: --llm-model HF://: an HF:// id names a Hugging Face "
     "repository after the prefix, such as HF://mlc-ai/Llama-3-8B-Instruct-q4f16_1-MLC"),
    (["--llm-model", "does-not-exist"],
     f"ERROR: --llm-model does-not-exist: unknown model 'does-not-exist': use a preset ({PRESETS}) "
     "or a local Hugging Face checkpoint directory"),
    (["--llm-prompt-len", "2000", "--llm-max-tokens", "100"],
     "ERROR: --llm-prompt-len 2000 + --llm-max-tokens 100 = 2100 tokens exceed the max_position_embeddings "
     "(2048) of model 'tiny'"),
    (["--benchmark-max-time=2"],
     "ERROR: --benchmark-max-time has no meaning here (each round is one whole generation): use --llm-num-runs"),
    (["--benchmark-warmup=on"],
     "ERROR: --benchmark-warmup has no meaning here (each round is one whole generation): use --llm-warmup-runs"),
    (["--benchmark-disable"], "ERROR: --benchmark-disable would run one round and store it as --llm-num-runs "
     "rounds: use --llm-num-runs 1 --llm-warmup-runs 0 for a smoke run"),
    (["--benchmark-cprofile=tottime"], "ERROR: --benchmark-cprofile would add a profiled generation to the "
     "measured rounds: use --llm-torch-profile (one extra generation, profiled and stored apart)"),
]


def refused(*args, cwd=ROOT) -> str:
    """pytest on the benchmarks with `args`: a usage error (exit 4) before anything was collected;
    the one line that says why."""
    r = run_pytest(ROOT / "benchmarks", "--co", "-q", *args, cwd=cwd)
    out = r.stdout + r.stderr
    assert r.returncode == 4, out[-2000:]
    assert "Traceback" not in out and "collected" not in out, out[-2000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith(("ERROR: --", "__main__.py: error:"))]
    return line.removeprefix("__main__.py: ")


@pytest.mark.parametrize("args,line", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_anything_runs(args, line):
    assert refused(*args) == line


ON_CPU = "the engine runs on cpu"
TRITON_ON_CPU = "Triton kernels need a CUDA device here, not cpu (TRITON_INTERPRET=1 runs them on CPU)"
NOT_ON_CPU = [
    (["--llm-allreduce", "lamport"], "ERROR: --llm-allreduce lamport: 'lamport' needs CUDA GPUs (symmetric memory); "
     "on CPU the all-reduce is the process group's, gloo (use auto or nccl)"),
    (["--llm-allreduce", "symm"], "ERROR: --llm-allreduce symm: 'symm' needs CUDA GPUs (symmetric memory); "
     "on CPU the all-reduce is the process group's, gloo (use auto or nccl)"),
    (["--llm-decode-attention", "triton"], f"ERROR: --llm-decode-attention triton: {TRITON_ON_CPU}"),
    (["--llm-gemv", "triton"], f"ERROR: --llm-gemv triton: {TRITON_ON_CPU}"),
    (["--llm-cuda-graphs"], f"ERROR: --llm-cuda-graphs: CUDA graphs need a CUDA device; {ON_CPU}"),
    (["--llm-pdl"], f"ERROR: --llm-pdl: programmatic dependent launch needs a CUDA GPU (Hopper or later); {ON_CPU}"),
]


@pytest.mark.parametrize("args,line", NOT_ON_CPU, ids=[" ".join(a) for a, _ in NOT_ON_CPU])
def test_choices_the_cpu_cannot_run_are_refused_once(monkeypatch, args, line):
    """Not in every rank's start-up, one failed benchmark after another (with a kept log folder)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert refused("--llm-device", "cpu", *args) == line


def test_options_from_pytest_addopts_are_refused_too(monkeypatch):
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-cprofile=tottime")
    assert refused().startswith("ERROR: --benchmark-cprofile would add a profiled generation")


def test_a_folder_without_config_json_is_no_model(tmp_path):
    assert refused("--llm-model", tmp_path) == (
        f"ERROR: --llm-model {tmp_path}: checkpoint directory '{tmp_path}' has no config.json: a Hugging Face "
        "Llama checkpoint needs config.json next to its *.safetensors files")


def test_an_unwritable_results_folder_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("")  # a folder below a file: unwritable even for root
    assert refused("--llm-results-dir", tmp_path / "file" / "res") == (
        f"ERROR: --llm-results-dir {tmp_path / 'file' / 'res'}: cannot write there (Not a directory)")


def test_a_results_file_that_cannot_be_appended_to_is_refused_at_start(tmp_path):
    (tmp_path / "res" / "runs.jsonl").mkdir(parents=True)  # not after every benchmark has measured
    assert refused("--llm-results-dir", tmp_path / "res") == (
        f"ERROR: --llm-results-dir {tmp_path / 'res'}: cannot append to {tmp_path / 'res' / 'runs.jsonl'} "
        "(Is a directory)")


def test_the_results_check_leaves_nothing_behind(tmp_path):
    r = run_pytest(ROOT / "benchmarks", "--co", "-q", "--llm-results-dir", tmp_path / "res")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list((tmp_path / "res").iterdir()) == []


def test_a_bad_checkpoint_is_refused_naming_file_and_field(tmp_path):
    checkpoint(tmp_path, num_attention_heads=0)
    assert refused("--llm-model", tmp_path) == (
        f"ERROR: --llm-model {tmp_path}: {tmp_path / 'config.json'}: field 'num_attention_heads' is 0: must be > 0")


SMALL = ["--llm-batch-sizes", "1", "--llm-prompt-len", "4", "--llm-warmup-runs", "0", "-k", "test_baseline"]


def _run(tmp_path, *args):
    out = tmp_path / "run.json"
    r = run_pytest(ROOT / "benchmarks", *SMALL, *args, "--llm-results-dir", tmp_path / "res", f"--benchmark-json={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    (b,) = json.loads(out.read_text())["benchmarks"]
    return r.stdout, b


def test_benchmark_min_rounds_is_honoured(tmp_path):
    stdout, b = _run(tmp_path, "--llm-max-tokens", "2", "--llm-num-runs", "2", "--benchmark-min-rounds=7")
    assert b["stats"]["rounds"] == 7 and b["options"]["min_rounds"] == 7
    assert b["extra_info"]["rounds"] == 7 and len(b["extra_info"]["ttft_ms_rounds"]) == 7
    assert "7 timed rounds (--benchmark-min-rounds)" in stdout and "min_rounds=7" in stdout


def test_pytest_benchmark_header_shows_the_rounds_that_run(monkeypatch):
    r = run_pytest(ROOT / "benchmarks", "--co", "--llm-num-runs", "4")
    assert r.returncode == 0, r.stdout[-2000:]
    assert " min_rounds=4 " in r.stdout and "4 timed rounds (--llm-num-runs)" in r.stdout
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-min-rounds=6")  # given outside the command line
    r = run_pytest(ROOT / "benchmarks", "--co", "--llm-num-runs", "4")
    assert " min_rounds=6 " in r.stdout and "6 timed rounds (--benchmark-min-rounds)" in r.stdout


def test_one_output_token_row_says_why_it_has_no_tpot(tmp_path):
    stdout, b = _run(tmp_path, "--llm-max-tokens", "1", "--llm-num-runs", "2")
    e = b["extra_info"]
    assert e["tpot_ms_note"] == "one output token: TPOT, ITL, MBU and scaling need --llm-max-tokens >= 2"
    assert "no tpot_ms: one output token: TPOT, ITL, MBU and scaling need --llm-max-tokens >= 2" in stdout
    assert not {"tpot_ms_p50", "tpot_ms_mean", "itl_ms_p50", "mbu"} & set(e)
    assert e["ttft_ms_p50"] > 0


STANDIN = '''"""Stand-in for a plugin with options of plain names (pytest-playwright registers --device)."""
def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="device to emulate")
    parser.addoption("--max-tokens", default=None, help="one of the suite's aliases, taken first")


def pytest_report_header(config):
    return f"stand-in: device={config.getoption('device')!r} max-tokens={config.getoption('max_tokens')!r}"
'''


def test_another_plugins_device_option_beside_ours(tmp_path):
    """Each option keeps its own value both ways; the alias another plugin took is left to it."""
    (tmp_path / "standin_plugin.py").write_text(STANDIN)
    r = run_pytest("-p", "standin_plugin", ROOT / "benchmarks", "--co",
                   "--device", "iPhone 11", "--max-tokens", "7", "--llm-device", "cpu", "--llm-max-tokens", "3",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stand-in: device='iPhone 11' max-tokens='7'" in r.stdout
    assert "model tiny on cpu" in r.stdout and "16+3 tokens" in r.stdout


# -- checkpoints -------------------------------------------------------------------------------------
GOOD = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False}
GOOD_CFG = ModelConfig("ckpt", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                       num_kv_heads=2)


def good_tensors(**changed):
    """Zeros of every weight's shape under GOOD, with `changed` ones replaced (None: left out)."""
    t = {n: np.zeros(weight_shape(GOOD_CFG, n), np.float32) for n in weight_names(GOOD_CFG)}
    t.update(changed)
    return {k: v for k, v in t.items() if v is not None}


def checkpoint(path, tensors=None, config_text=None, **fields):
    """A tiny Llama checkpoint in `path`: GOOD's config.json with `fields` changed (None: removed),
    or `config_text` as is, and `tensors` (default: good_tensors())."""
    cfg = {k: v for k, v in {**GOOD, **fields}.items() if v is not None}
    (path / "config.json").write_text(config_text if config_text is not None else json.dumps(cfg))
    save_file(good_tensors() if tensors is None else tensors, str(path / "model.safetensors"))
    return path


K = "model.layers.0.self_attn.k_proj.weight"
BAD_CONFIGS = [
    ({"config_text": '{"vocab_size": 64,'},
     "config.json: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 19)"),
    ({"config_text": "[64, 32]"}, "config.json: expected a JSON object, found list"),
    ({"hidden_size": None}, "config.json: missing field 'hidden_size'"),
    ({"num_attention_heads": 0}, "config.json: field 'num_attention_heads' is 0: must be > 0"),
    ({"num_key_value_heads": -2}, "config.json: field 'num_key_value_heads' is -2: must be > 0"),
    ({"hidden_size": "32"}, "config.json: field 'hidden_size' is \"32\": expected an integer"),
    ({"num_hidden_layers": 1.5}, "config.json: field 'num_hidden_layers' is 1.5: expected an integer"),
    ({"hidden_size": 30}, "config.json: hidden_size 30 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"head_dim": 16}, "config.json: head_dim 16 differs from hidden_size / num_attention_heads = 8 (not supported)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "config.json rope_scaling: rope_type \"yarn\" is not supported (plain RoPE or llama3)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "config.json rope_scaling: missing field 'low_freq_factor'"),
    ({"model_type": "qwen2"}, "config.json: model_type \"qwen2\" is not supported (llama only)"),
    ({"attention_bias": True}, "config.json: attention_bias is true: this engine's Llama has no biases"),
    ({"tensors": good_tensors(**{K: np.zeros((32, 32), np.float32)})},
     f"model.safetensors: tensor '{K}' has shape [32, 32], config.json gives [16, 32] "
     "(num_key_value_heads*head_dim x hidden_size)"),
    ({"num_key_value_heads": 4},  # the config, not the file, differs
     f"model.safetensors: tensor '{K}' has shape [16, 32], config.json gives [32, 32] "
     "(num_key_value_heads*head_dim x hidden_size)"),
    ({"tensors": good_tensors(**{"model.layers.0.mlp.down_proj.weight": None})},
     ": no tensor 'model.layers.0.mlp.down_proj.weight' in its *.safetensors files"),
    ({"tensors": good_tensors(**{"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})},
     "model.safetensors: tensor 'model.layers.0.self_attn.q_proj.bias': this engine's Llama has no biases, "
     "so the checkpoint's model is not the one it would run"),
    ({"tensors": good_tensors(**{K: np.zeros((16, 32), np.int8)})},
     f"model.safetensors: tensor '{K}' is I8: only float weights (F64, F32, F16, BF16) load"),
]


@pytest.mark.parametrize("change,line", BAD_CONFIGS, ids=[b[1][:60] for b in BAD_CONFIGS])
def test_a_bad_checkpoint_is_one_line_naming_file_and_field(tmp_path, change, line):
    checkpoint(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        from_hf_config(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path)) and msg.endswith(line), msg


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=r"model\.safetensors: not a readable safetensors file \(.*header"):
        from_hf_config(tmp_path)


def test_the_engine_refuses_a_bad_checkpoint_before_starting_ranks(tmp_path):
    checkpoint(tmp_path, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        TPEngine(EngineConfig(model=str(tmp_path), tp=1))


def test_a_good_checkpoint_loads_with_transformers_5_rope_parameters(tmp_path):
    """transformers >= 5 writes RoPE's base and scaling into `rope_parameters` (no rope_theta):
    read there, or RoPE would silently use the default base."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = from_hf_config(checkpoint(tmp_path, rope_theta=None, rope_parameters=rope))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 8, 1)


def test_weights_changed_after_the_check_are_named_when_read(tmp_path):
    cfg = from_hf_config(checkpoint(tmp_path))
    save_file(good_tensors(**{K: np.zeros((8, 32), np.float32)}), str(tmp_path / "model.safetensors"))
    src = WeightSource(cfg, 0, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/model\.safetensors: tensor '{K}' has shape \[8, 32\], "
                                          r"config.json gives \[16, 32\]"):
        src.get(K, 0, 0, 2)
    assert src.get("model.layers.0.self_attn.q_proj.weight", 0, 1, 2).shape == (16, 32)


def test_a_tensor_in_two_files_is_refused(tmp_path):
    """Which copy loaded depended on the order the files were read: the second file's, silently.
    The loader refuses it too (a file added after the check)."""
    second = tmp_path / "model-2.safetensors"
    line = (f"{tmp_path / 'model.safetensors'}: tensor '{K}' is also in {second}: a checkpoint holds each "
            "tensor once (which copy would load depends on the order the files are read)")  # read in name order
    cfg = from_hf_config(checkpoint(tmp_path))
    save_file({K: np.ones((16, 32), np.float32)}, str(second))
    with pytest.raises(ConfigError) as e:
        from_hf_config(tmp_path)
    assert str(e.value) == line
    with pytest.raises(ConfigError) as e:
        WeightSource(cfg, 0, torch.device("cpu"), torch.float32)
    assert str(e.value) == line


def test_layers_past_num_hidden_layers_are_refused(tmp_path):
    """A checkpoint with 2 layers read as 1 (num_hidden_layers) ran a model with its second layer
    left out, without a word; harmless extras (rotary_emb.inv_freq) still load."""
    layer1 = {n.replace("layers.0.", "layers.1."): np.zeros(weight_shape(GOOD_CFG, n), np.float32)
              for n in weight_names(GOOD_CFG) if n.startswith("model.layers.0.")}
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    checkpoint(tmp_path, tensors=good_tensors(**layer1))
    with pytest.raises(ConfigError) as e:
        from_hf_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'model.safetensors'}: tensor 'model.layers.1.")
    assert str(e.value).endswith("' is of layer 1, but config.json's num_hidden_layers is 1: that layer would be "
                                 "left out silently")
    assert from_hf_config(checkpoint(tmp_path, tensors=good_tensors(**layer1), num_hidden_layers=2)).num_layers == 2
    assert from_hf_config(checkpoint(tmp_path, tensors=good_tensors(**inv_freq))).num_layers == 1


def test_the_engine_refuses_lengths_past_max_position_embeddings(tmp_path):
    """For every caller (pytest refuses it too, as a usage error): before any rank starts."""
    ckpt = checkpoint(tmp_path, max_position_embeddings=4)
    with pytest.raises(ConfigError, match=r"^prompt \+ output = 12 tokens exceed the max_position_embeddings \(4\) "
                                          rf"of model '{ckpt}'$"):
        TPEngine(EngineConfig(model=str(ckpt), tp=1, max_seq=12))
