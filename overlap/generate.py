"""`python -m overlap.generate`: one batch from the built-in engine, printed as one JSON object
(generated token ids per request and per-token latencies), for people and scripts. Its options are
the benchmark options of the same names (llm_bench.options), checked the same way."""
from __future__ import annotations

import argparse
import json
import sys

from llm_bench import options
from llm_bench.engine import ConfigError, EngineError, ModeNotApplicable, random_prompts

from .config import EngineConfig, resolve_model
from .engine import TPEngine


def parser() -> argparse.ArgumentParser:
    ap = options.OneLineParser(prog="python -m overlap.generate", description=__doc__)
    ap.add_argument("--model", type=str, default="tiny", help="preset name or local HF checkpoint directory")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    options.add_single(ap, "--tp", "tp_sizes", "TP size", default=1)
    options.add_single(ap, "--batch-size", "batch_sizes", "requests in the batch", default=1)
    options.add_single(ap, "--overlap", "overlap_modes", "overlap mode", default="none")
    ap.add_argument("--prompt-len", **{**options.OPTIONS["prompt_len"].argparse_kwargs(), "default": 8})
    ap.add_argument("--max-tokens", **{**options.OPTIONS["max_tokens"].argparse_kwargs(), "default": 16})
    options.add_arguments(ap, options.engine_fields(), gpu=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        vocab = resolve_model(a.model).vocab_size
        cfg = EngineConfig(model=a.model, tp=a.tp, device=a.device, overlap=a.overlap,
                           batch_sizes=(a.batch_size,), max_seq=a.prompt_len + a.max_tokens,
                           **{n: getattr(a, n) for n in options.engine_fields()})
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
        "overlap_applied": g.info["overlap_applied"], "num_streams": a.num_streams,
        "decode_micro_batches": g.info["decode_micro_batches"], "prefill_chunks": g.info["prefill_chunks"],
        "allreduce": d["allreduce"],
        "tokens": g.tokens, "token_latency_ms": [round(x, 4) for x in lat],
        "ttft_ms": round(lat[0], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
