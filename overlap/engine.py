"""The engine object: owns the rank processes of one (model, TP, overlap mode) and talks to them.

One process per rank (spawned, so no CUDA state is inherited), NCCL on GPUs and gloo on CPU. A rank
that crashes or hangs is detected within the timeout, reported with its exit status and the tail of
its log, and every rank is reaped: no process survives `close()`, an exception, or Ctrl-C (ranks
also die with the engine process through PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Listener, wait

from .config import ConfigError, resolve_model
from .streams import ModeNotApplicable, applied_parts, check_applicable

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class EngineError(RuntimeError):
    """The engine failed: a rank crashed, hung, ran out of memory or raised."""


@dataclass
class EngineConfig:
    model: str = "tiny"
    tp: int = 1
    device: str = "cpu"               # "cpu" or "cuda"
    overlap: str = "none"
    allreduce: str = "auto"           # nccl | symm | auto (symm where it works, else NCCL)
    batch_sizes: tuple = (1,)         # decode graphs are captured for these at build time
    max_seq: int = 256                # prompt + output tokens the KV cache holds
    seed: int = 0
    num_streams: int = 2
    dtype: str | None = None          # default: bfloat16 on GPU, float32 on CPU
    cuda_graphs: bool = True
    gpu_ids: tuple | None = None      # visible GPU indices for ranks 0..tp-1 (default 0..tp-1)
    timeout_s: float = 300.0          # one request (and NCCL's own timeout)
    build_timeout_s: float = 1800.0   # start-up: weights, graphs
    prefetch_bytes: int | None = None  # L2 prefetch budget per all-reduce (default: half of L2)
    copy_bw: float | None = None      # known copy bandwidth (bytes/s) to skip measuring it again

    def resolved(self) -> "EngineConfig":
        c = EngineConfig(**asdict(self))
        c.batch_sizes = tuple(sorted(set(int(b) for b in c.batch_sizes)))
        c.dtype = c.dtype or ("bfloat16" if c.device == "cuda" else "float32")
        c.gpu_ids = tuple(c.gpu_ids) if c.gpu_ids else tuple(range(c.tp))
        return c


@dataclass
class Generation:
    """One batch: tokens per request and when each step's tokens reached the host.

    A static batch produces every request's i-th token in the same step, so `token_ns` is shared."""
    tokens: list[list[int]]
    submit_ns: int
    token_ns: list[int]
    start_ns: int = 0                 # when rank 0 began prefill
    info: dict = field(default_factory=dict)
    request_token_ns: list | None = None  # per-request times, for engines whose requests run apart
    rank_token_ns: list | None = None     # per rank: when each step ended on that rank's host

    def times_per_request(self) -> list[list[int]]:
        return self.request_token_ns or [self.token_ns] * len(self.tokens)


def visible_gpus() -> int:
    """GPUs this process may use, without creating a CUDA context here."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: no GPUs
        return 0


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_waitable(proc: subprocess.Popen):
    """A file descriptor that becomes readable when `proc` exits (Linux pidfd), or None."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE: "weakref.WeakSet[TPEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for e in list(_LIVE):
        e.close()


class TPEngine:
    """The built-in engine. `generate()` runs one batch; `close()` reaps every rank."""

    name = "builtin"

    def __init__(self, config: EngineConfig):
        self.config = c = config.resolved()
        self.procs: list = []
        self.conns: list = []
        self.dead: str | None = None
        cfg = resolve_model(c.model)
        cfg.check_tp(c.tp)
        for b in c.batch_sizes:
            if b < 1:
                raise ConfigError(f"batch size must be >= 1, got {b}")
        if c.device == "cuda":
            n = visible_gpus()
            need = max(c.gpu_ids) + 1
            if need > n or len(c.gpu_ids) != c.tp:
                raise ConfigError(f"TP={c.tp} needs {c.tp} GPUs (ids {list(c.gpu_ids)}) but {n} "
                                  f"{'is' if n == 1 else 'are'} visible")
        elif c.device != "cpu":
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {c.device!r}")
        self.model_config = cfg
        self.logdir = tempfile.mkdtemp(prefix=f"llm-bench-{c.model.replace('/', '_')}-tp{c.tp}-")
        spec = asdict(c)
        spec["parent_pid"] = os.getpid()
        spec["max_batch"] = max(c.batch_sizes)
        self._sentinels = []
        for k, v in NCCL_SAFE_ENV.items():
            os.environ.setdefault(k, v)
        _LIVE.add(self)
        try:
            self._spawn(spec)
            replies = self._collect("start-up", c.build_timeout_s)
        except BaseException:
            self.close()
            raise
        self.ranks = [r[1] for r in replies]

    def _spawn(self, spec: dict) -> None:
        """Start `python -m overlap.worker` per rank (a fresh interpreter: no CUDA state and no
        re-import of the caller's main module) and accept each rank's authenticated connection."""
        key = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=key) as lst:
            env = dict(os.environ, LLM_BENCH_AUTHKEY=key.hex(), PYTHONPATH=os.pathsep.join(
                [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            port = _free_port()
            for r in range(self.config.tp):
                log = open(self._log(r), "w")
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "overlap.worker", str(r), str(self.config.tp), str(port),
                     f"{lst.address[0]}:{lst.address[1]}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env))
                log.close()
            conns: dict[int, object] = {}
            lst._listener._socket.settimeout(60)
            while len(conns) < self.config.tp:
                dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
                if dead:
                    self._fail(f"rank {dead[0]} exited with code {self.procs[dead[0]].returncode} at start-up", dead)
                try:
                    conn = lst.accept()
                except (TimeoutError, OSError) as e:
                    self._fail(f"ranks did not connect within 60 s ({e})", list(range(self.config.tp)))
                r = conn.recv()
                conn.send(spec)
                conns[r] = conn
            self.conns = [conns[r] for r in range(self.config.tp)]
        self._sentinels = [_exit_waitable(p) for p in self.procs]

    def _log(self, r: int) -> str:
        return os.path.join(self.logdir, f"rank{r}.log")

    def _log_tail(self, r: int, n: int = 15) -> str:
        try:
            with open(self._log(r)) as f:
                lines = f.read().splitlines()[-n:]
            return "\n".join("    " + ln for ln in lines)
        except OSError:
            return ""

    # -- talking to the ranks ------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if self.dead:
            raise EngineError(f"engine is dead: {self.dead}")
        for conn in self.conns:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                pass  # the rank is gone; _collect reports it

    def _collect(self, what: str, timeout: float) -> list:
        """Wait for one reply per rank; raise with the cause if a rank errs, dies or hangs."""
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple] = {}
        while len(replies) < len(self.conns):
            waiting = {self.conns[r]: r for r in range(len(self.conns)) if r not in replies}
            sentinels = {self._sentinels[r]: r for r in waiting.values() if self._sentinels[r] is not None}
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no reply to {what} within {timeout:.0f} s from rank(s) "
                           f"{sorted(waiting.values())} (hung; raise --engine-timeout if this is a slow build)",
                           sorted(waiting.values()))
            ready = wait(list(waiting) + list(sentinels), timeout=min(left, 1.0 if sentinels else 0.2))
            for obj in ready:
                if obj in waiting:
                    r = waiting[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        continue  # the sentinel tells how it died
                    if msg[0] == "error":
                        _, kind, text, tb = msg
                        self._fail(f"rank {r} failed during {what}: {text}", [r], kind=kind, tb=tb)
                    replies[r] = msg
            for r in list(waiting.values()):
                if r in replies or self.procs[r].poll() is None:
                    continue
                if self.conns[r].poll():  # a reply (or EOF) may still be readable
                    try:
                        replies[r] = self.conns[r].recv()
                        if replies[r][0] != "error":
                            continue
                    except (EOFError, OSError):
                        pass
                code = self.procs[r].returncode
                how = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exit code {code}")
                self._fail(f"rank {r} (pid {self.procs[r].pid}) died with {how} during {what}", [r])
        return [replies[r] for r in range(len(self.conns))]

    def _fail(self, why: str, ranks: list[int], kind: str = "error", tb: str | None = None):
        logs = "\n".join(f"  rank {r} log ({self._log(r)}):\n{self._log_tail(r)}" for r in ranks)
        self.dead = why
        self.close()
        where = ""
        if tb:  # the rank's own traceback, last frames: where in the runtime it failed
            frames = [ln for ln in tb.splitlines() if ln.startswith("  File ")][-4:]
            where = "\n  rank traceback (last frames):\n" + "\n".join("  " + f.strip() for f in frames)
        msg = why + where + (f"\n{logs}" if logs.strip() else "")
        if kind == "config":
            raise ConfigError(why)
        if kind == "mode":
            raise ModeNotApplicable(why)
        if kind == "oom":
            raise EngineError(f"out of memory: {why}\n{logs}")
        raise EngineError(msg)

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
        why = check_applicable(c.overlap, batch)
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
        self._send(("generate", prompts, int(max_tokens), bool(comm_free)))
        replies = self._collect("generate", self.config.timeout_s)
        res = replies[0][1]
        info = {"overlap_applied": ",".join(applied_parts(self.config.overlap, len(prompts))) or "none"}
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
        self._send(("profile", self._prompts(prompts, max_tokens), int(max_tokens), path))
        self._collect("torch profile", self.config.timeout_s)
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
        self._send(("logits", self._prompts(prompts)))
        return self._collect("logits", self.config.timeout_s)[0][1]

    def collective(self, nbytes: int, iters: int = 50, use_graph: bool = True) -> dict:
        self._send(("collective", int(nbytes), int(iters), bool(use_graph)))
        return self._collect("collective benchmark", self.config.timeout_s)[0][1]

    def crash_rank(self, rank: int) -> None:
        """Test hook: SIGKILL one rank as if it segfaulted, then report like any dead rank."""
        self._send(("crash", rank))
        self._collect("crash test", self.config.timeout_s)

    def describe(self) -> dict:
        c, r0 = self.config, self.ranks[0]
        return {
            "engine": self.name, "model": c.model, "tp": c.tp, "device": c.device, "overlap": c.overlap,
            "dtype": r0["dtype"], "allreduce": r0["allreduce"], "allreduce_requested": c.allreduce,
            "symm_error": r0["symm_error"], "cuda_graphs": r0["cuda_graphs"], "num_streams": c.num_streams,
            "weight_bytes_per_step": r0["weight_bytes_per_step"], "kv_bytes_per_token": r0["kv_bytes_per_token"],
            "copy_bw_bytes_per_s": [r["copy_bw_bytes_per_s"] for r in self.ranks],
            "gpu_names": [r.get("gpu_name") for r in self.ranks if r.get("gpu_name")],
            "gpu_ids": list(c.gpu_ids) if c.device == "cuda" else [],
            "torch": r0["torch"], "params": self.model_config.param_count(), "max_seq": c.max_seq,
            "vocab_size": r0["vocab_size"], "timestamp_ns": r0["timestamp_ns"],
            "streams_created": r0["streams_created"], "pids": [p.pid for p in self.procs], "logdir": self.logdir,
        }

    def close(self) -> None:
        """Stop every rank: ask, wait briefly, then SIGTERM and SIGKILL. Safe to call twice."""
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        for fd in getattr(self, "_sentinels", []):
            if fd is not None:
                os.close(fd)
        self._sentinels = []
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        if not self.dead:
            self.dead = "closed"
        _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
