"""The built-in engine: owns the rank processes of one (model, TP, overlap mode) and talks to them.

One process per rank (`overlap.worker`, started and watched by `overlap.procs.EngineProcesses`), NCCL on
GPUs and gloo on CPU. A rank that crashes or hangs is reported with its cause and every rank is reaped.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from llm_bench.engine import ConfigError, EngineError, Generation, ModeNotApplicable
from llm_bench.procs import EngineProcesses

from .config import EngineConfig, resolve_model

__all__ = ["EngineConfig", "EngineError", "Generation", "TPEngine", "visible_gpus"]

# The ranks talk over loopback only: NCCL's bootstrap and socket transport, and gloo, bind there.
LOOPBACK_ENV = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}


def visible_gpus() -> int:
    """GPUs this process may use, without creating a CUDA context here."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: no GPUs
        return 0


class TPEngine:
    """The built-in engine. `generate()` runs one batch; `close()` reaps every rank."""

    name = "builtin"

    def __init__(self, config: EngineConfig):
        self.config = c = config.resolved()
        cfg = resolve_model(c.model)
        cfg.check_tp(c.tp)
        if c.max_seq > cfg.max_position_embeddings:  # RoPE past them is a model nobody trained
            raise ConfigError(f"prompt + output = {c.max_seq} tokens exceed the max_position_embeddings "
                              f"({cfg.max_position_embeddings}) of model '{c.model}'")
        if c.device == "cuda":
            n = visible_gpus()
            need = max(c.gpu_ids) + 1
            if need > n or len(c.gpu_ids) != c.tp:
                raise ConfigError(f"TP={c.tp} needs {c.tp} GPUs (ids {list(c.gpu_ids)}) but {n} "
                                  f"{'is' if n == 1 else 'are'} visible")
        self.model_config = cfg
        self.logdir = tempfile.mkdtemp(prefix=f"llm-bench-{os.path.basename(c.model.rstrip('/'))}-tp{c.tp}-")
        # torch.distributed's rendezvous: a file store in the log folder, so nothing listens on a port.
        spec = {"config": c, "store": os.path.join(self.logdir, "rendezvous")}
        self.procs = EngineProcesses("overlap.worker", c.tp, spec, self.logdir, c.build_timeout, env=LOOPBACK_ENV)
        self.ranks = self.procs.ready

    @property
    def dead(self) -> str | None:
        return self.procs.dead

    # -- the interface the benchmarks use ------------------------------------------------------------
    def check(self, batch: int, prompt_len: int, max_tokens: int) -> None:
        """Refuse requests the engine cannot serve, before anything is sent to the ranks."""
        c = self.config
        if max_tokens < 1 or prompt_len < 1:
            raise ConfigError("prompt length and max tokens must be >= 1")
        if prompt_len + max_tokens > c.max_seq:
            raise ConfigError(f"prompt ({prompt_len}) + output ({max_tokens}) = {prompt_len + max_tokens} "
                              f"tokens do not fit the KV cache of {c.max_seq} tokens per sequence")
        if batch > max(c.batch_sizes):
            raise ConfigError(f"batch {batch} is larger than the engine's largest batch "
                              f"{max(c.batch_sizes)} (its KV cache is sized for that)")
        why = c.schedule().not_applicable(batch, prompt_len)
        if why:
            raise ModeNotApplicable(why)

    def _prompts(self, prompts: list[list[int]], max_tokens: int = 1) -> list[list[int]]:
        """Prompts as plain ints, refused here when the ranks could not serve them: an id outside
        the vocabulary would be a device-side assert on a GPU, which kills the engine."""
        if not prompts or len({len(p) for p in prompts}) != 1:
            raise ConfigError("a batch needs at least one prompt, all of the same length")
        self.check(len(prompts), len(prompts[0]), max_tokens)
        out = [list(map(int, p)) for p in prompts]
        vocab = self.model_config.vocab_size
        bad = next((t for p in out for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ConfigError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
        return out

    def generate(self, prompts: list[list[int]], max_tokens: int, comm_free: bool = False) -> Generation:
        prompts = self._prompts(prompts, max_tokens)
        submit = time.perf_counter_ns()
        self.procs.send(("generate", prompts, int(max_tokens), bool(comm_free)))
        replies = self.procs.collect("generate", self.config.engine_timeout)
        res = replies[0][1]
        schedule, batch, prompt_len = self.config.schedule(), len(prompts), len(prompts[0])
        info = {"overlap_applied": ",".join(schedule.applied(batch, prompt_len)) or "none",
                # what --num-streams became at this shape (at most one part per sequence or token)
                "decode_micro_batches": len(schedule.decode_chunks(batch)),
                "prefill_chunks": len(schedule.prefill_chunks(batch, prompt_len))}
        if "mem_peak_gb" in res:
            info["gpu_mem_gb_peak"] = res["mem_peak_gb"]
        for k in ("step_gap_us_p50", "step_gap_us_mean"):
            if k in res:
                info[k] = res[k]
        g = Generation(res["tokens"], submit, res["token_ns"], res["start_ns"], info)
        g.rank_token_ns = [r[1]["token_ns"] for r in replies]  # each rank's step ends, for traces
        return g

    def torch_profile(self, prompts: list[list[int]], max_tokens: int, path: str) -> str:
        """One generation under torch.profiler on every rank, merged into one Chrome trace at `path`
        with one process per rank (kernel-level view: GEMMs, attention, NCCL/symm all-reduces)."""
        self.procs.send(("profile", self._prompts(prompts, max_tokens), int(max_tokens), path))
        self.procs.collect("torch profile", self.config.engine_timeout)
        merged = []
        for r in range(self.config.tp):
            part = f"{path}.rank{r}"
            with open(part) as f:
                d = json.load(f)
            os.remove(part)
            for e in d.get("traceEvents", []):
                if isinstance(e, dict) and "pid" in e:
                    e["pid"] = f"rank {r}: {e['pid']}"
                    merged.append(e)
            merged.append({"name": "process_name", "ph": "M", "pid": f"rank {r}", "tid": 0,
                           "args": {"name": f"rank {r}"}})
        with open(path, "w") as f:
            json.dump({"traceEvents": merged, "displayTimeUnit": "ms"}, f)
        return path

    def logits(self, prompts: list[list[int]]):
        self.procs.send(("logits", self._prompts(prompts)))
        return self.procs.collect("logits", self.config.engine_timeout)[0][1]

    def step_logits(self, prompts: list[list[int]], forced: list[list[int]]):
        """float32 logits [k + 1, batch, vocab] of the prompts' last position and of k decode steps that
        read `forced` (k tokens per prompt), through this engine's overlap schedule and CUDA graphs
        (Runner.step_logits): what the overlap modes are compared on. Refused like `generate` of
        k + 1 tokens would be, and when `forced` does not give k tokens for every prompt."""
        if not isinstance(forced, (list, tuple)) or len(forced) != len(prompts):
            raise ConfigError(f"forced tokens: one row per prompt ({len(prompts)}), got "
                              f"{len(forced) if isinstance(forced, (list, tuple)) else type(forced).__name__}")
        if len({len(f) for f in forced}) > 1:
            raise ConfigError("forced tokens: every row needs the same number of tokens")
        if not all(len(p) for p in prompts):
            raise ConfigError("a prompt needs at least one token")
        k = len(forced[0]) if forced else 0
        # Checked as the prompts they extend (lengths, the vocabulary, the KV cache, the mode).
        rows = self._prompts([list(p) + list(f) for p, f in zip(prompts, forced)], 1)
        p = len(rows[0]) - k
        self.procs.send(("step_logits", [r[:p] for r in rows], [r[p:] for r in rows]))
        return self.procs.collect("step logits", self.config.engine_timeout)[0][1]

    def collective(self, nbytes: int, iters: int = 50, use_graph: bool = True) -> dict:
        self.procs.send(("collective", int(nbytes), int(iters), bool(use_graph)))
        return self.procs.collect("collective benchmark", self.config.engine_timeout)[0][1]

    def crash_rank(self, rank: int) -> None:
        """Test hook: SIGKILL one rank as if it segfaulted, then report like any dead rank."""
        self.procs.send(("crash", rank))
        self.procs.collect("crash test", self.config.engine_timeout)

    def describe(self) -> dict:
        c, r0 = self.config, self.ranks[0]
        return {
            "engine": self.name, "model": c.model, "tp": c.tp, "device": c.device, "overlap": c.overlap,
            "dtype": r0["dtype"], "allreduce": r0["allreduce"], "allreduce_requested": c.allreduce,
            "symm_error": r0["symm_error"], "lamport_error": r0["lamport_error"], "ce_error": r0["ce_error"],
            "prefill_chunk_allreduce": r0["prefill_chunk_allreduce"],
            "cuda_graphs": r0["cuda_graphs"], "compiled": r0["compiled"],
            "decode_attention": r0["decode_attention"], "gemv": r0["gemv"], "pdl": r0["pdl"],
            "copy_bw_reused": r0["copy_bw_reused"],
            "prefetch_bytes": r0["prefetch_bytes"], "num_streams": c.num_streams,
            "weight_bytes_per_step": r0["weight_bytes_per_step"], "kv_bytes_per_token": r0["kv_bytes_per_token"],
            "copy_bw_bytes_per_s": [r["copy_bw_bytes_per_s"] for r in self.ranks],
            "gpu_names": [r.get("gpu_name") for r in self.ranks if r.get("gpu_name")],
            "gpu_ids": list(c.gpu_ids) if c.device == "cuda" else [],
            "torch": r0["torch"], "params": self.model_config.param_count(), "max_seq": c.max_seq,
            "vocab_size": r0["vocab_size"], "timestamp_ns": r0["timestamp_ns"],
            "streams_created": r0["streams_created"], "pids": self.procs.pids, "logdir": self.logdir,
        }

    def close(self) -> None:
        """Stop every rank (ask, then SIGTERM, then SIGKILL). Safe to call twice."""
        self.procs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
