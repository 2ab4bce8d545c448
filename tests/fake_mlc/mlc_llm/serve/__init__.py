"""The fake's `mlc_llm.serve.EngineConfig` (a dataclass, as in MLC; only the fields the adapter sets)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None
    model_lib: str | None = None
    mode: str | None = None
    tensor_parallel_shards: int | None = None
    max_num_sequence: int | None = None
    max_total_sequence_length: int | None = None
    max_single_sequence_length: int | None = None
    prefix_cache_mode: str = "radix"
