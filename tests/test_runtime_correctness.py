"""The built-in runtime computes the right function: logits match Hugging Face transformers'
LlamaForCausalLM on the same weights, and TP=2/4 over gloo give TP=1's tokens and logits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llm_bench.engine import random_prompts
from overlap.config import PRESETS, resolve_model
from overlap.model import WeightSource, greedy_local

SEED = 3
# fp32 on CPU: differences come from summation order only, far below this.
LOGIT_ATOL = 1e-4


def hf_model(cfg, state):
    transformers = pytest.importorskip("transformers")
    rs = dict(cfg.rope_scaling, rope_type="llama3")
    hcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, rope_scaling=rs,
        tie_word_embeddings=cfg.tie_word_embeddings)
    m = transformers.LlamaForCausalLM(hcfg).eval()
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m


@pytest.fixture(scope="module")
def tiny_state():
    cfg = PRESETS["tiny"]
    return cfg, WeightSource(cfg, SEED, torch.device("cpu"), torch.float32).state_dict()


def test_logits_match_transformers(engine_factory, tiny_state):
    cfg, state = tiny_state
    prompts = random_prompts(2, 12, cfg.vocab_size, 0)
    eng = engine_factory(tp=1, seed=SEED, batch_sizes=(2,), max_seq=40)
    ours = eng.logits(prompts)
    hf = hf_model(cfg, state)
    with torch.no_grad():
        ref = hf(torch.tensor(prompts)).logits.numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)

    # Greedy decode through the KV cache and the decode path: the same tokens as HF's greedy
    # generation, and HF's logits over prompt + generated tokens match ours position by position.
    gen = eng.generate(prompts, 8)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(prompts), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             eos_token_id=None, pad_token_id=0)
    assert gen.tokens == hf_out[:, 12:].tolist()
    full = [p + t for p, t in zip(prompts, gen.tokens)]
    with torch.no_grad():
        np.testing.assert_allclose(eng.logits(full), hf(torch.tensor(full)).logits.numpy(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(engine_factory, tp):
    prompts = random_prompts(3, 10, PRESETS["tiny"].vocab_size, 1)
    one = engine_factory(tp=1, seed=SEED, batch_sizes=(3,), max_seq=40)
    many = engine_factory(tp=tp, seed=SEED, batch_sizes=(3,), max_seq=40)
    np.testing.assert_allclose(many.logits(prompts), one.logits(prompts), atol=LOGIT_ATOL, rtol=0)
    assert many.generate(prompts, 16).tokens == one.generate(prompts, 16).tokens
    one.close()
    many.close()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)")
def test_compiled_blocks_give_the_eager_tokens_and_logits(engine_factory):
    """--compile (torch.compile of the attention and MLP blocks, TP=2 over gloo): the same function."""
    prompts = random_prompts(2, 6, PRESETS["tiny"].vocab_size, 2)
    eager = engine_factory(tp=2, seed=SEED, batch_sizes=(2,), max_seq=12)
    compiled = engine_factory(tp=2, seed=SEED, batch_sizes=(2,), max_seq=12, compile=True)
    assert compiled.describe()["compiled"] and not eager.describe()["compiled"]
    assert compiled.generate(prompts, 6).tokens == eager.generate(prompts, 6).tokens
    np.testing.assert_allclose(compiled.logits(prompts), eager.logits(prompts), atol=LOGIT_ATOL, rtol=0)
    eager.close()
    compiled.close()


@pytest.mark.parametrize("vocab", [1024, 128256, 64128, 50257])  # tiny, Llama-3 at TP=1 and 2, a prime
def test_greedy_in_vocabulary_blocks_is_the_plain_max(vocab):
    """greedy_local's two-level max: the values and indices of one max over the logits, ties to the
    lowest index (the best column copied to the last one)."""
    g = torch.Generator().manual_seed(vocab)
    h, w = torch.randn(3, 1, 32, generator=g), torch.randn(vocab, 32, generator=g)
    want = (h @ w.t()).max(dim=-1)
    w[-1] = w[want.indices[0, 0]]
    for x in (h, h[:1]):
        val, idx = greedy_local(x @ w.t())
        ref = (x @ w.t()).max(dim=-1)
        assert torch.equal(val, ref.values) and torch.equal(idx, ref.indices)
    assert greedy_local(h[:1] @ w.t())[1].item() == want.indices[0, 0].item()


def test_checkpoint_directory_loads_and_shards(engine_factory, tiny_state, tmp_path):
    """A local HF checkpoint (config.json + safetensors) gives the same model, sharded per rank."""
    from safetensors.torch import save_file

    cfg, state = tiny_state
    half = len(state) // 2
    names = sorted(state)
    save_file({k: state[k] for k in names[:half]}, str(tmp_path / "model-00001.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(tmp_path / "model-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_scaling": dict(cfg.rope_scaling, rope_type="llama3"), "tie_word_embeddings": False}))
    loaded = resolve_model(str(tmp_path))
    assert loaded.checkpoint and loaded.num_kv_heads == cfg.num_kv_heads
    prompts = random_prompts(1, 6, cfg.vocab_size, 2)
    ref = engine_factory(tp=1, seed=SEED, max_seq=20).generate(prompts, 6).tokens
    ck = engine_factory(model=str(tmp_path), tp=2, max_seq=20)
    assert ck.generate(prompts, 6).tokens == ref


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_step_inputs_come_in_with_one_copy(batch):
    """A decode step's token buffer 0 and position are views of one tensor, the position 16-byte
    aligned (compiled kernels assume it), and `copy_inputs` fills both from one host slot."""
    from overlap.config import EngineConfig
    from overlap.runner import Runner

    cfg = EngineConfig(model="tiny", batch_sizes=(batch,), max_seq=16).resolved()
    r = Runner(0, 1, torch.device("cpu"), cfg, build_graphs=False)
    buf = r.buffers(batch)
    inputs = buf["inputs"]
    assert buf["tok"][0].data_ptr() == inputs.data_ptr()
    assert buf["pos"].data_ptr() - inputs.data_ptr() == buf["pos_at"] * 8 and buf["pos_at"] * 8 % 16 == 0
    assert buf["pos_at"] >= batch and buf["tok"][1].data_ptr() != inputs.data_ptr()
    for slot in (0, 1):
        tokens = torch.arange(batch) + 100 * (slot + 1)
        buf["host_tok"][slot].copy_(tokens)
        r.copy_inputs(buf, slot, 7 + slot)
        assert buf["tok"][0].tolist() == tokens.tolist() and buf["pos"].tolist() == [7 + slot]
