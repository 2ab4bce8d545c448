"""The engine interface the benchmarks measure through, shared by both engines (the built-in runtime in
`overlap/` and MLC-LLM in `llm_bench.mlc`): what a generation returns, the errors an engine raises,
and the prompts every benchmark sends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class EngineError(RuntimeError):
    """The engine failed: a process crashed, hung, ran out of memory or raised."""


class ConfigError(ValueError):
    """A model or engine configuration that cannot run, with a message a user understands."""


class ModeNotApplicable(ValueError):
    """An overlap mode that cannot apply to a configuration (it says why instead of running `none`)."""


@dataclass
class Generation:
    """One batch: tokens per request and when each step's tokens reached the host.

    A static batch produces every request's i-th token in the same step, so `token_ns` is shared;
    engines whose requests run apart give `request_token_ns` (per request) instead."""
    tokens: list[list[int]]
    submit_ns: int
    token_ns: list[int]
    start_ns: int = 0                     # when the engine began prefill (0: not observed)
    info: dict = field(default_factory=dict)
    request_token_ns: list | None = None  # per-request times, for engines whose requests run apart
    rank_token_ns: list | None = None     # per rank: when each step ended on that rank's host

    def times_per_request(self) -> list[list[int]]:
        return self.request_token_ns or [self.token_ns] * len(self.tokens)


class Engine(Protocol):
    """What a benchmark needs of an engine. `check` refuses a shape before anything runs;
    `describe` says what actually runs (resolved options, versions, GPUs)."""
    def generate(self, prompts: list[list[int]], max_tokens: int, comm_free: bool = False) -> Generation: ...
    def check(self, batch: int, prompt_len: int, max_tokens: int) -> None: ...
    def describe(self) -> dict: ...
    def close(self) -> None: ...


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (the benchmarks' prompts): exact lengths, no tokenizer needed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, prompt_len)).tolist()
