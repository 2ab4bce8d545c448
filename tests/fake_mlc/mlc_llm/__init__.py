"""A test double of MLC-LLM's in-process Python API (mlc-ai/mlc-llm 79d603f0), for the CPU tests of
llm_bench.mlc: the calls the adapter makes, with the behaviour of real MLC that decides what a
benchmark measures, read from MLC's and TVM's source (the project's MLC research note, section 11):

- serve/engine.py: a scheduler with MLC's KV pages (16 tokens, ceil(capacity / 16) + 1 of them), its
  prefill admission and decode preemption rules, hybrid prefill, one step per event-loop tick for all
  running requests, a streamed chunk per step unless its text is empty, the finish chunk, the usage
  chunk with every `usage.extra` key (the conditional ones too), the engine-side times, a trace.
- The compiled library is a small JSON file of the metadata real MLC compiles into its .so;
  `cli/model_metadata._extract_metadata` reads it; TP comes from it, not from EngineConfig, and the
  resolved engine config does not echo it; a missing library is a FileNotFoundError.
- At TP > 1, tp - 1 worker processes (cli/worker.py) started as TVM's disco process pool starts them:
  plain Popen, no parent-death signal, exiting when their pipe from the engine closes.

It runs no model (no tokens are computed); its timings are those of its own Python steps.
Knobs (environment of the engine process, read when an engine is built):
  FAKE_MLC_EMPTY_TEXT_SHARE  share of steps whose text delta is empty and so not sent (default 0.3)
  FAKE_MLC_SEED              seed of which steps those are (default 0)
  FAKE_MLC_KV_PAGES          the KV cache's page count instead of MLC's (to provoke preemption)
  FAKE_MLC_STALL_AT_STEP     the engine stops stepping at this step, as one stuck in a collective
  FAKE_MLC_EXIT_AT_STEP      the engine process exits (code 3) at this step, as a crash
  FAKE_MLC_WORKER_HANGS=1    TP workers never read their pipe and ignore SIGTERM (stuck in NCCL)
"""
from .libinfo import __version__
from .serve import AsyncMLCEngine

__all__ = ["AsyncMLCEngine", "__version__"]
