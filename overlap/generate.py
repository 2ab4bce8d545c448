"""`python -m overlap.generate`: one batch from the built-in engine, printed as one JSON object
(generated token ids per request and per-token latencies), for people and scripts."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import kernels
from .comm import ALLREDUCE_CHOICES
from .config import ConfigError
from .engine import EngineConfig, EngineError, TPEngine
from .streams import MODES, ModeNotApplicable


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (the benchmarks' prompts): exact lengths, no tokenizer needed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, prompt_len)).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overlap.generate", description=__doc__)
    ap.add_argument("--model", default="tiny", help="preset name or local HF checkpoint directory")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap", choices=MODES, default="none")
    ap.add_argument("--allreduce", choices=ALLREDUCE_CHOICES, default="auto")
    ap.add_argument("--num-streams", type=int, default=2)
    ap.add_argument("--prefetch-mb", type=float, help="L2 prefetch per all-reduce (prefetch/full; default half of L2)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the blocks (default: on for cuda, off for cpu)")
    ap.add_argument("--decode-attention", choices=kernels.CHOICES["--decode-attention"], default="auto",
                    help="decode attention: the fused Triton kernel, SDPA, or auto (Triton where it runs)")
    ap.add_argument("--gemv", choices=kernels.CHOICES["--gemv"], default="auto",
                    help="batch-1 weight products: the Triton GEMV with fixed configurations, torch's, or auto "
                         "(Triton where it runs)")
    a = ap.parse_args(argv)
    from .config import resolve_model

    try:
        vocab = resolve_model(a.model).vocab_size
        cfg = EngineConfig(model=a.model, tp=a.tp, device=a.device, overlap=a.overlap, allreduce=a.allreduce,
                           batch_sizes=(a.batch_size,), max_seq=a.prompt_len + a.max_tokens, seed=a.seed,
                           num_streams=a.num_streams, cuda_graphs=not a.no_cuda_graphs, compile=a.compile,
                           decode_attention=a.decode_attention, gemv=a.gemv,
                           prefetch_bytes=None if a.prefetch_mb is None else int(a.prefetch_mb * 2**20))
        with TPEngine(cfg) as eng:
            eng.check(a.batch_size, a.prompt_len, a.max_tokens)
            g = eng.generate(random_prompts(a.batch_size, a.prompt_len, vocab, a.seed), a.max_tokens)
            d = eng.describe()
    except (ConfigError, ModeNotApplicable, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lat = [(b - a_) / 1e6 for a_, b in zip([g.submit_ns] + g.token_ns[:-1], g.token_ns)]
    print(json.dumps({
        "model": a.model, "tp": a.tp, "device": a.device, "overlap": a.overlap,
        "overlap_applied": g.info["overlap_applied"], "allreduce": d["allreduce"],
        "tokens": g.tokens, "token_latency_ms": [round(x, 4) for x in lat],
        "ttft_ms": round(lat[0], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
