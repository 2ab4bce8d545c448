"""The fake `AsyncMLCEngine`: MLC's engine construction checks, its server-mode config inference, its
scheduler (KV pages, admission, preemption, hybrid prefill) and its streaming, without a model.

What each part mirrors in mlc-ai/mlc-llm (79d603f0) and apache/tvm:
- construction: `serve/engine_base.py` (_check_engine_config, _process_model_args: FileNotFoundError
  for a missing library, JIT otherwise), `cpp/serve/config.cc` (server mode: max_num_sequence from the
  library, max_total_sequence_length = min(fits, batch x single), single length clamped to the
  compiled context window), `cpp/serve/engine.cc` CreateDiscoSession (TP from the library's metadata,
  tp - 1 workers from tvm `runtime/disco/process_pool.py`), `get_complete_engine_config` (no TP in it).
- scheduling: tvm `paged_kv_cache.cc` (ceil(capacity / 16) + 1 pages), `engine_actions/
  batch_prefill_base.cc` (admission: one page per running sequence plus the new pages plus one per
  sequence must be free, `total + input + 8 * batch <= max_total`, prefill chunk and batch limits;
  hybrid mode folds the running requests' decode into the prefill step), `batch_decode.cc` (one free
  page per running sequence, else preempt the last running request: it goes to the front of the
  waiting queue and its prompt and tokens are prefilled again, `action_commons.cc`), one action per
  engine step (`engine.cc` Step).
- streaming: `engine_base.py` process_completion_stream_output (a step with empty text is not sent
  unless it finishes the request; then the usage chunk, only with include_usage), `metrics.cc`
  (usage.extra keys and their definitions), `event_trace_recorder.cc` (the trace's JSON).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..cli.model_metadata import _extract_metadata
from .config import EngineConfig

PAGE = 16
GPU_KV_TOKENS = 1 << 20  # the KV tokens the fake "GPU" would hold, for server mode without a capacity


def _pages(tokens: int) -> int:
    return -(-tokens // PAGE)


# -- what the stream carries (mlc_llm/protocol/openai_api_protocol.py) ---------------------------------------
@dataclass
class CompletionResponseChoice:
    index: int
    finish_reason: str | None
    text: str
    logprobs: object = None


@dataclass
class CompletionUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    extra: dict | None = None


@dataclass
class CompletionResponse:
    id: str
    choices: list
    model: str | None = None
    usage: CompletionUsage | None = None


class EventTraceRecorder:
    """Events per request; `dump_json` gives MLC's Chrome trace: "start X"/"finish X" as B/E of "X (k)",
    anything else an instant, ts in microseconds since the epoch, pid 1, tid the request id."""

    def __init__(self):
        self.events: dict[str, list] = {}
        self.counts: dict[tuple, int] = {}

    def add_event(self, request_id: str, event: str) -> None:
        k = self.counts.get((request_id, event), 0)
        self.counts[(request_id, event)] = k + 1
        self.events.setdefault(request_id, []).append((f"{event} ({k})", time.time()))

    def dump_json(self) -> str:
        out = []
        for rid, evs in self.events.items():
            for event, t in sorted(evs, key=lambda e: e[1]):
                name, ph = event, "i"
                for prefix, phase in (("start ", "B"), ("finish ", "E")):
                    if event.startswith(prefix):
                        name, ph = event[len(prefix):], phase
                out.append({"name": name, "ph": ph, "ts": int(t * 1e6), "pid": 1, "tid": rid})
        return json.dumps(out)


# -- the scheduler ------------------------------------------------------------------------------------------
class _Request:
    def __init__(self, rid: str, prompt_len: int, max_tokens: int, include_usage: bool):
        self.id, self.prompt_len, self.max_tokens, self.include_usage = rid, prompt_len, max_tokens, include_usage
        self.inputs = prompt_len  # tokens waiting to be prefilled
        self.kv = 0               # tokens in the KV cache
        self.committed = 0        # output tokens so far
        self.held = 0             # output characters not yet sent (a token whose text was empty)
        self.prefill_tokens = self.decode_tokens = 0
        self.add_t = self.prefill_end_t = None
        self.queue: asyncio.Queue = asyncio.Queue()


class _Scheduler:
    def __init__(self, cfg: EngineConfig, tracer: EventTraceRecorder | None):
        self.cfg, self.tracer = cfg, tracer
        pages = os.environ.get("FAKE_MLC_KV_PAGES")
        self.pages_total = int(pages) if pages else _pages(cfg.max_total_sequence_length) + 1
        self.empty_share = float(os.environ.get("FAKE_MLC_EMPTY_TEXT_SHARE", "0.3"))
        self.rng = random.Random(int(os.environ.get("FAKE_MLC_SEED", "0")))
        self.stall_at = int(os.environ.get("FAKE_MLC_STALL_AT_STEP", "0"))
        self.exit_at = int(os.environ.get("FAKE_MLC_EXIT_AT_STEP", "0"))
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.steps = 0
        self.loop = self.task = self.wake = None

    def trace(self, reqs, event: str) -> None:
        if self.tracer is not None:
            for r in reqs:
                self.tracer.add_event(r.id, event)

    def available_pages(self) -> int:
        return self.pages_total - sum(_pages(r.kv) for r in self.running)

    def add(self, req: _Request) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is None:  # MLC binds to the event loop of its first request
            self.loop, self.wake = loop, asyncio.Event()
            self.task = loop.create_task(self._run())
        elif loop is not self.loop:
            raise RuntimeError("the engine serves the event loop of its first request only")
        req.add_t = time.perf_counter()
        self.trace([req], "request added to engine")
        self.waiting.append(req)
        self.wake.set()

    async def _run(self) -> None:
        try:
            while True:
                if self.stall_at and self.steps >= self.stall_at:
                    await asyncio.Event().wait()  # never set: the engine stops here
                if self.exit_at and self.steps >= self.exit_at:
                    os._exit(3)
                if self._prefill() or self._decode():
                    self.steps += 1
                    await asyncio.sleep(0)  # one step per event-loop tick: its chunks are read before the next
                else:  # nothing can run until a request arrives
                    self.wake.clear()
                    await self.wake.wait()
        except Exception as e:
            for r in self.waiting + self.running:
                r.queue.put_nowait(e)
            raise

    def _prefill(self) -> bool:
        """Admit waiting requests in order while MLC's conditions hold (whole requests: the fake does
        not chunk a prompt); in hybrid mode the running requests decode in the same step."""
        if not self.waiting or len(self.running) > self.available_pages():
            return False
        cfg, avail = self.cfg, self.available_pages()
        total_input = required = len(self.running)  # each running request: one token, one page
        current = sum(r.kv for r in self.running)
        admitted = []
        for r in self.waiting:
            total_input += r.inputs
            required += _pages(r.inputs)
            batch = len(self.running) + len(admitted) + 1
            if not (batch <= min(cfg.max_num_sequence, cfg.prefill_chunk_size)
                    and total_input <= cfg.prefill_chunk_size and required + batch <= avail
                    and current + total_input + 8 * batch <= cfg.max_total_sequence_length):
                break
            admitted.append(r)
        if not admitted:
            return False
        decoding = list(self.running) if cfg.prefill_mode == "hybrid" else []
        self.trace(admitted + decoding, "start prefill")
        for r in admitted:
            self.waiting.remove(r)
            r.kv += r.inputs
            r.prefill_tokens += r.inputs
            r.inputs = 0
        for r in decoding:
            r.kv += 1
        self.running += admitted
        now = time.perf_counter()
        for r in admitted:
            r.committed += 1
            if r.committed == 1:
                r.prefill_end_t = now
        for r in decoding:  # a hybrid decode request's prefill end is overwritten (batch_prefill_base.cc)
            r.committed += 1
            r.prefill_end_t = now
        self.trace(admitted + decoding, "finish prefill")
        self._post(admitted + decoding)
        return True

    def _decode(self) -> bool:
        if not self.running:
            return False
        while len(self.running) > self.available_pages():
            r = self.running.pop()
            self.trace([r], "preempt")
            r.inputs, r.kv = r.prompt_len + r.committed, 0
            self.waiting.insert(0, r)
            if not self.running:
                raise RuntimeError("There should be at least one request state entry that can run decode.")
        self.trace(self.running, "start decode")
        for r in self.running:
            r.kv += 1
            r.committed += 1
            r.decode_tokens += 1
        self.trace(self.running, "finish decode")
        self._post(list(self.running))
        return True

    def _post(self, reqs: list[_Request]) -> None:
        """Each request's step output: its new token's text (empty for some tokens: held back and sent
        with a later one); a step with empty text is not sent unless it finishes the request."""
        for r in reqs:
            r.held += 1
            text = ""
            if self.rng.random() >= self.empty_share:
                text, r.held = "x" * r.held, 0
            done = r.committed >= r.max_tokens or r.prompt_len + r.committed >= self.cfg.max_single_sequence_length
            if done or text:
                self.trace([r], "yield delta output")
                r.queue.put_nowait(CompletionResponse(r.id, [CompletionResponseChoice(
                    0, "length" if done else None, text)]))
            if done:
                self.running.remove(r)
                self._finish(r)

    def _finish(self, r: _Request) -> None:
        t = time.perf_counter()
        e2e, ttft = t - r.add_t, r.prefill_end_t - r.add_t
        extra = {"prompt_tokens": r.prompt_len, "completion_tokens": r.committed, "prefill_tokens": r.prefill_tokens,
                 "decode_tokens": r.decode_tokens, "jump_forward_tokens": 0}
        if r.prefill_tokens:
            extra["prefill_tokens_per_s"] = r.prefill_tokens / ttft
        if r.decode_tokens:
            extra["decode_tokens_per_s"] = r.decode_tokens / (t - r.prefill_end_t)
        extra.update(end_to_end_latency_s=e2e, ttft_s=ttft, inter_token_latency_s=e2e / r.committed)
        if r.include_usage:
            self.trace([r], "yield final usage")
            r.queue.put_nowait(CompletionResponse(r.id, [], usage=CompletionUsage(
                r.prompt_len, r.committed, r.prompt_len + r.committed, extra)))
        self.trace([r], "finish")
        r.queue.put_nowait(None)


# -- the engine ---------------------------------------------------------------------------------------------
def _check_engine_config(model, model_lib, mode, cfg: EngineConfig) -> None:
    for name, given in (("model", model), ("model_lib", model_lib), ("mode", mode)):
        set_ = getattr(cfg, name)
        if set_ is not None and given is not None and set_ != given:
            raise ValueError(f'The argument "{name}" of engine constructor is "{given}", while the "{name}" '
                             f'field in argument "engine_config" is "{set_}".')
    if cfg.kv_cache_page_size != 16:
        raise ValueError("KV cache only supports page size 16")


def _jit(model_dir: Path, chat: dict, cfg: EngineConfig, device: str) -> str:
    """No library given: MLC compiles one (interface/jit.py), with the config's tensor_parallel_shards,
    cached under $MLC_LLM_HOME/model_lib by a hash of the overrides."""
    home = os.environ.get("MLC_LLM_HOME")
    if not home:
        raise RuntimeError("the fake compiles into $MLC_LLM_HOME only")
    meta = {"model_type": chat.get("model_type", "llama"), "quantization": chat.get("quantization", "q0f16"),
            "tensor_parallel_shards": cfg.tensor_parallel_shards or chat.get("tensor_parallel_shards", 1),
            "pipeline_parallel_stages": 1, "context_window_size": chat.get("context_window_size", -1),
            "prefill_chunk_size": cfg.prefill_chunk_size or chat.get("prefill_chunk_size", 2048),
            "max_batch_size": cfg.max_num_sequence or 128}
    key = hashlib.md5(json.dumps([str(model_dir), meta, device], sort_keys=True).encode()).hexdigest()
    path = Path(home) / "model_lib" / f"{key}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))
    return str(path)


def _resolve(cfg: EngineConfig, meta: dict, chat: dict, model: str, lib: str, mode: str) -> EngineConfig:
    """Server mode's inference (config.cc); the result is read back as MLC's C++ config JSON has it,
    which has no tensor_parallel_shards."""
    compiled_ctx = meta.get("context_window_size", -1)
    ctx = [c for c in (compiled_ctx, chat.get("context_window_size", -1)) if c != -1]
    single = min(ctx) if ctx else 1 << 62
    if cfg.max_single_sequence_length is not None:
        single = min(cfg.max_single_sequence_length, compiled_ctx if compiled_ctx != -1 else 1 << 62)
    batch = cfg.max_num_sequence or meta["max_batch_size"]
    total = cfg.max_total_sequence_length or min(GPU_KV_TOKENS, batch * single)
    chunk = cfg.prefill_chunk_size or min(meta["prefill_chunk_size"], chat.get("prefill_chunk_size", 1 << 62))
    return EngineConfig(model=model, model_lib=lib, mode=mode,
                        gpu_memory_utilization=cfg.gpu_memory_utilization or 0.85,
                        max_num_sequence=batch, max_total_sequence_length=total, max_single_sequence_length=single,
                        prefill_chunk_size=chunk, max_history_size=0, prefix_cache_mode=cfg.prefix_cache_mode,
                        prefix_cache_max_num_recycling_seqs=cfg.prefix_cache_max_num_recycling_seqs or batch,
                        speculative_mode=cfg.speculative_mode, spec_draft_length=cfg.spec_draft_length,
                        prefill_mode=cfg.prefill_mode, verbose=cfg.verbose)


def _start_workers(num_workers: int) -> list:
    """Workers 1 .. num_workers - 1 as TVM's DiscoPopenWorker starts them: a pipe pair each, plain Popen."""
    workers = []
    for i in range(1, num_workers):
        main_read, worker_write = os.pipe()
        worker_read, main_write = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "mlc_llm.cli.worker", str(i), str(num_workers), "1",
                                 str(worker_read), str(worker_write)], pass_fds=(worker_read, worker_write))
        os.close(worker_read)
        os.close(worker_write)
        workers.append((proc, main_read, main_write))  # the engine's ends stay open while it lives
    return workers


class AsyncCompletion:
    def __init__(self, engine: AsyncMLCEngine):
        self.engine = engine

    async def create(self, *, prompt, model=None, best_of=1, echo=False, frequency_penalty=None,
                     presence_penalty=None, logprobs=None, logit_bias=None, max_tokens=None, n=1, seed=None,
                     stop=None, stream=False, stream_options=None, suffix=None, temperature=None, top_p=None,
                     user=None, response_format=None, request_id=None, extra_body=None):
        """MLC's signature, fixed (no **kwargs). The fake has no tokenizer and no EOS: token-id prompts,
        streaming, ignore_eos and max_tokens are required; prompts are not chunked."""
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise NotImplementedError("the fake has no tokenizer: token-id prompts only")
        if not stream:
            raise NotImplementedError("the fake streams only")
        debug = (extra_body or {}).get("debug_config") or {}
        if debug.get("ignore_eos") is not True or not isinstance(max_tokens, int):
            raise ValueError("the fake generates no EOS: it needs max_tokens and debug_config.ignore_eos")
        sched = self.engine._sched
        if len(prompt) > sched.cfg.prefill_chunk_size:
            raise NotImplementedError("the fake does not chunk a prompt longer than prefill_chunk_size")
        self.engine._count += 1
        req = _Request(request_id or f"cmpl-{self.engine._count}", len(prompt), max_tokens,
                       bool((stream_options or {}).get("include_usage")))
        return self._stream(sched, req)

    @staticmethod
    async def _stream(sched: _Scheduler, req: _Request):
        sched.add(req)  # as in MLC, the request reaches the engine when the stream is first read
        while True:
            item = await req.queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class AsyncMLCEngine:
    def __init__(self, model: str, device="auto", *, model_lib: str | None = None, mode: str = "local",
                 engine_config: EngineConfig | None = None, enable_tracing: bool = False):
        cfg = engine_config if engine_config is not None else EngineConfig()
        _check_engine_config(model, model_lib, mode, cfg)
        if mode != "server" or not str(device).startswith("cuda:"):
            raise NotImplementedError(f"the fake runs mode='server' on a cuda device, got {mode!r}, {device!r}")
        if cfg.prefix_cache_mode != "disable":
            raise NotImplementedError("the fake has no prefix cache: prefix_cache_mode must be 'disable'")
        model_dir = Path(model)
        with open(model_dir / "mlc-chat-config.json") as f:
            chat = json.load(f)
        if model_lib is not None:
            if not Path(model_lib).is_file():
                raise FileNotFoundError(f"The `model_lib` you passed in is not a file: {model_lib}.\n")
        else:
            model_lib = _jit(model_dir, chat, cfg, str(device))
        meta = _extract_metadata(Path(model_lib))
        self.engine_config = _resolve(cfg, meta, chat, str(model_dir), str(model_lib), mode)
        self._workers = _start_workers(int(meta["tensor_parallel_shards"]))  # the library's TP, not cfg's
        self.state = SimpleNamespace(trace_recorder=EventTraceRecorder() if enable_tracing else None)
        self._sched = _Scheduler(self.engine_config, self.state.trace_recorder)
        self._count = 0
        self.completions = AsyncCompletion(self)

    def terminate(self) -> None:
        """Stops the engine loop; like MLC's, it does not end the workers (the process exit does)."""
        s = self._sched
        if s.loop is not None and not s.loop.is_closed():
            s.loop.call_soon_threadsafe(s.task.cancel)
