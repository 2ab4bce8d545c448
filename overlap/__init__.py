"""The built-in tensor-parallel inference runtime: the suite's embedded default engine.

`overlap.config` holds model shapes, `overlap.model` the Llama decoder with Megatron-style TP,
`overlap.comm` the collectives, `overlap.streams` the overlap machinery, `overlap.worker` one rank's
loop and `overlap.engine` the object that owns the rank processes.
"""
