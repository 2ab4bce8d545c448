"""The peer: Hugging Face transformers' LlamaForCausalLM with a static KV cache, same shapes, same
card, random bf16 weights; prints one JSON line with TTFT and TPOT (median of --runs).

    python scripts/hf_peer.py --model llama3-8b --prompt-len 128 --max-tokens 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (overlap)

from overlap.config import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    c = resolve_model(a.model)
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        rope_scaling=dict(c.rope_scaling, rope_type="llama3"), tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, a.prompt_len), device="cuda")
    kw = dict(do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    for _ in range(2):
        timed(a.max_tokens)
    ttft = statistics.median(timed(1) for _ in range(a.runs))
    e2e = statistics.median(timed(a.max_tokens) for _ in range(a.runs))
    tpot = (e2e - ttft) / (a.max_tokens - 1)
    print(json.dumps({"peer": f"transformers {transformers.__version__} static cache", "model": a.model,
                      "gpu": torch.cuda.get_device_name(), "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
                      "decode_tok_per_s": 1 / tpot}))


if __name__ == "__main__":
    main()
