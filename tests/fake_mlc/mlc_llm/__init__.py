"""A test double of MLC-LLM's in-process Python API: only what fixtures/mlc_engine.py calls, shaped as
../shared/reference/mlc-llm-api.md §1-§3 describes it. It runs no model: it lets the CPU tests drive
the adapter's engine process, protocol, stream parsing and teardown, and it refuses requests that
break the API contract the adapter relies on (token-id prompts, ignore_eos, usage in the stream).

Knobs (environment, read when a request starts): FAKE_MLC_TOKENS_PER_CHUNK (default 1; MLC may pack
several tokens into one chunk), FAKE_MLC_EXIT_AFTER_CHUNKS (the process exits mid-stream, as a crash)."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

__version__ = "0.0.0+fake"


class _Completions:
    def __init__(self, engine):
        self.engine = engine

    async def create(self, *, prompt, max_tokens, stream=False, stream_options=None, extra_body=None,
                     temperature=None, **_):
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise TypeError("the fake expects a token-id prompt")
        if not stream or (stream_options or {}).get("include_usage") is not True:
            raise ValueError("the fake expects stream=True with include_usage")
        if (extra_body or {}).get("debug_config", {}).get("ignore_eos") is not True:
            raise ValueError("without ignore_eos the output length is not fixed")
        return self._stream(len(prompt), max_tokens)

    async def _stream(self, prompt_len: int, n: int):
        per = int(os.environ.get("FAKE_MLC_TOKENS_PER_CHUNK", "1"))
        exit_after = int(os.environ.get("FAKE_MLC_EXIT_AFTER_CHUNKS", "0"))
        added = time.perf_counter()
        sent, chunks, first = 0, 0, None
        while sent < n:
            k = min(per, n - sent)
            sent += k
            chunks += 1
            first = first or time.perf_counter()
            self.engine.events.append({"name": f"decode ({chunks})", "ph": "i", "ts": time.time() * 1e6,
                                       "pid": 1, "tid": 0})
            if exit_after and chunks > exit_after:
                os._exit(3)
            yield SimpleNamespace(choices=[SimpleNamespace(index=0, text="x" * k, finish_reason=None)],
                                  usage=None)
        done = time.perf_counter()
        extra = {"prompt_tokens": prompt_len, "completion_tokens": n, "ttft_s": first - added,
                 "end_to_end_latency_s": done - added}
        if n > 1 and done > first:
            extra["decode_tokens_per_s"] = (n - 1) / (done - first)
        yield SimpleNamespace(choices=[], usage=SimpleNamespace(prompt_tokens=prompt_len, completion_tokens=n,
                                                                total_tokens=prompt_len + n, extra=extra))


class AsyncMLCEngine:
    def __init__(self, model, device="auto", *, model_lib=None, mode="local", engine_config=None,
                 enable_tracing=False):
        from .serve import EngineConfig

        if mode != "server" or not str(device).startswith("cuda:"):
            raise ValueError(f"the fake expects mode='server' and a cuda device, got {mode!r}, {device!r}")
        cfg = engine_config or EngineConfig()
        if cfg.prefix_cache_mode != "disable":
            raise ValueError("prefix cache must be off for benchmarks")
        self.engine_config = EngineConfig(**{**vars(cfg), "model": model, "model_lib": model_lib, "mode": mode})
        self.completions = _Completions(self)
        self.events: list[dict] = []
        recorder = SimpleNamespace(dump_json=lambda: json.dumps(self.events)) if enable_tracing else None
        self.state = SimpleNamespace(trace_recorder=recorder)

    def terminate(self) -> None:
        self.completions = None
