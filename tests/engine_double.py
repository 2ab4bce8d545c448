"""An engine double for the harness's own tests: llm_bench.engine.Engine in this process, doing real work
(numpy: per request and token, each layer's matrix-vector products and a dot over the request's own
cache) and stamping each token with `time.perf_counter_ns()` when it is ready. Every generation it
returns is logged (JSON lines, with the test that asked for it), so a test computes each stored column
from the very timestamps the harness saw. Two things set it apart from the built-in engine, on purpose:
- its prefill starts late: after submit it busy-waits `QUEUE_NS` on the clock (a request queued before
  the engine takes it), so TTFT from submit and TTFT from the start of prefill differ;
- its requests run apart (one after another within a step), so each has its own token times
  (`request_token_ns`) and per-request, pooled and per-round statistics all differ.
`use_double(log)` puts it in fixtures.engines.ENGINE_BUILDERS in place of the built-in engine."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from llm_bench.engine import ConfigError, Generation

DIM, LAYERS, VOCAB = 128, 2, 512
QUEUE_NS = 2_000_000
COMM_FLOATS = 1 << 16  # what stands for an all-reduce (TP > 1): one pass over 256 KiB per layer


def now() -> int:
    return time.perf_counter_ns()


class EngineDouble:
    """One (TP, overlap) key's engine. `copy_bw`: a bandwidth handed over by the pool (reported as
    reused); without one the double measures its own: the bytes of its weights over the fastest of 20
    passes that read them as a step does."""

    name = "double"

    def __init__(self, tp: int, overlap: str, log_path: str, copy_bw: float | None = None):
        rng = np.random.default_rng(tp)
        shard = DIM // tp
        self.tp, self.overlap, self.log_path = tp, overlap, log_path
        self.w_in = [rng.standard_normal((DIM, shard), dtype=np.float32) / DIM ** 0.5 for _ in range(LAYERS)]
        self.w_out = [rng.standard_normal((shard, DIM), dtype=np.float32) / shard ** 0.5 for _ in range(LAYERS)]
        self.head = rng.standard_normal((DIM, VOCAB), dtype=np.float32)
        self.embed = rng.standard_normal((VOCAB, DIM), dtype=np.float32)
        self.comm = rng.standard_normal(COMM_FLOATS, dtype=np.float32)
        self.weights = self.w_in + self.w_out + [self.head]
        self.copy_bw = copy_bw if copy_bw is not None else self._read_bw()
        self.reused = copy_bw is not None
        self.timestamp_ns = self._stamp_cost()
        self.dead = None
        self._log({"describe": self.describe()})

    def _read_bw(self) -> float:
        x = np.ones(DIM, dtype=np.float32)
        nbytes = sum(w.nbytes for w in self.weights)
        best = None
        for _ in range(20):
            t0 = now()
            for w in self.weights:
                x[: w.shape[0]] @ w
            dt = now() - t0
            best = dt if best is None else min(best, dt)
        return nbytes / (best / 1e9)

    @staticmethod
    def _stamp_cost() -> float:
        """What one token's timestamp costs (ns): the mean of 10000 clock reads."""
        t0 = now()
        for _ in range(10000):
            now()
        return (now() - t0) / 10000

    def _log(self, entry: dict) -> None:
        entry["test"] = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def describe(self) -> dict:
        return {"engine": self.name, "tp": self.tp, "overlap": self.overlap, "dtype": "float32",
                "vocab_size": VOCAB, "weight_bytes_per_step": sum(w.nbytes for w in self.weights),
                "kv_bytes_per_token": 2 * DIM * 4, "copy_bw_bytes_per_s": [self.copy_bw] * self.tp,
                "copy_bw_reused": self.reused, "timestamp_ns": self.timestamp_ns}

    def check(self, batch: int, prompt_len: int, max_tokens: int) -> None:
        if min(batch, prompt_len, max_tokens) < 1:
            raise ConfigError("batch, prompt length and max tokens must be >= 1")

    def _token(self, h, k, v, ctx: int, comm_free: bool):
        """One position of one request: attend over its cache, the layers, the greedy head."""
        k[ctx], v[ctx] = h, h
        s = k[: ctx + 1] @ h
        p = np.exp(s - s.max())
        h = h + (p / p.sum()) @ v[: ctx + 1]
        for wi, wo in zip(self.w_in, self.w_out):
            h = h + np.tanh(h @ wi) @ wo
            if self.tp > 1 and not comm_free:  # the all-reduce's stand-in: a pass over a buffer
                h = h + self.comm.reshape(-1, DIM).mean(axis=0)
        return h, int(np.argmax(h @ self.head))

    def generate(self, prompts: list[list[int]], max_tokens: int, comm_free: bool = False) -> Generation:
        submit = now()
        while now() - submit < QUEUE_NS:  # queued: the engine has not taken the batch yet
            pass
        start = now()
        n_ctx = len(prompts[0]) + max_tokens
        state, tokens, times = [], [], []
        for prompt in prompts:  # prefill, one request after another: each has its own first token
            k, v = np.zeros((n_ctx, DIM), np.float32), np.zeros((n_ctx, DIM), np.float32)
            for i, t in enumerate(prompt):
                _, tok = self._token(self.embed[t], k, v, i, comm_free)
            state.append((k, v))
            tokens.append([tok])
            times.append([now()])
        for step in range(1, max_tokens):
            ctx = len(prompts[0]) + step - 1
            for r, (k, v) in enumerate(state):
                _, tok = self._token(self.embed[tokens[r][-1]], k, v, ctx, comm_free)
                tokens[r].append(tok)
                times[r].append(now())
        token_ns = [max(ts[i] for ts in times) for i in range(max_tokens)]  # when each step's tokens are all out
        self._log({"tp": self.tp, "overlap": self.overlap, "comm_free": comm_free, "submit_ns": submit,
                   "start_ns": start, "request_token_ns": times})
        return Generation(tokens, submit, token_ns, start, {"overlap_applied": self.overlap},
                          request_token_ns=times)

    def close(self) -> None:
        self.weights = self.w_in = self.w_out = []


def use_double(log_path: str, copy_bw: float | None = None) -> None:
    """Build the engine double wherever the pool would build the built-in engine. `copy_bw`: a
    bandwidth to hand every double (as the pool hands a measured one to later engines)."""
    from fixtures import engines

    def build(pool, key):
        return EngineDouble(key.tp, key.overlap, log_path, copy_bw if copy_bw is not None else pool.copy_bw)
    engines.ENGINE_BUILDERS["builtin"] = build
