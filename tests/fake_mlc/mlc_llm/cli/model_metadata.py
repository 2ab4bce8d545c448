"""The fake of `mlc_llm.cli.model_metadata`: real MLC loads the compiled library and calls its
`_metadata` function; the fake's library is a JSON file holding that metadata (model_type,
quantization, context_window_size, prefill_chunk_size, tensor_parallel_shards,
pipeline_parallel_stages, max_batch_size, ... as `mlc_llm compile` records it)."""
from __future__ import annotations

import json
from pathlib import Path


def _extract_metadata(model_lib: Path) -> dict:
    with open(model_lib) as f:
        return json.load(f)
