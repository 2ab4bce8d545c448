"""The built-in tensor-parallel inference runtime: the suite's embedded default engine.

`overlap.config` holds model shapes and the typed EngineConfig, `overlap.model` the Llama decoder
with Megatron-style TP (a decode step: `TPLlama.hidden`), `overlap.comm` the collectives and the
all-reduce choice, `overlap.streams` the overlap machinery and `Schedule` (where pipelining applies),
`overlap.runner` one rank's graphs and generate loop, `overlap.worker` one rank's command loop and
`overlap.engine` the object that owns the rank processes. It receives typed options, never CLI flags.
"""
