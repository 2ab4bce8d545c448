"""The fake's `mlc_llm.serve.EngineConfig`: the same dataclass fields and defaults as MLC's
(python/mlc_llm/serve/config.py), so an argument MLC does not know fails here too."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = None
    model_lib: str | None = None
    additional_models: list = field(default_factory=list)
    mode: str | None = None
    tensor_parallel_shards: int | None = None
    pipeline_parallel_stages: int | None = None
    opt: str | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_page_size: int = 16
    max_num_sequence: int | None = None
    max_total_sequence_length: int | None = None
    max_single_sequence_length: int | None = None
    prefill_chunk_size: int | None = None
    sliding_window_size: int | None = None
    attention_sink_size: int | None = None
    max_history_size: int | None = None
    kv_state_kind: str | None = None
    speculative_mode: str = "disable"
    spec_draft_length: int = 0
    spec_tree_width: int = 1
    prefix_cache_mode: str = "radix"
    prefix_cache_max_num_recycling_seqs: int | None = None
    prefill_mode: str = "hybrid"
    verbose: bool = True
