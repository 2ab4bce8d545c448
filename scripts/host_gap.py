"""Where the host's turn-around between two `none` decode steps goes, at TP=1 and TP=2: the engine's own
generate loop (TPOT and GPU idle time between steps), the same steps back to back (the floor), and the
`none` loop rebuilt here with host timestamps around each part (copy inputs in, replay, queue the token
read-back, wait, read the tokens) and CUDA events around each step, under variants of how the host waits
and where its thread runs. One JSON line per rank and variant.

    python scripts/host_gap.py [--tp 1 2] [--model llama3-8b] [--batch-size 1] [--reps 3] [--pins - 4,20 -]

Variants (each on every rank, the same steps, so the ranks' collectives match):
  loop            the `none` loop as overlap/runner.py runs it, but waiting with cudaEventSynchronize
  loop-poll       the same, waiting by polling the event (cudaEventQuery in a loop), as the engine does
  loop-blocking   the same, waiting on an event made with blocking sync (the thread sleeps)
  loop-nocopy     without the host-to-device input copy (the steps alternate token buffers)
  *-pinA,B        with rank r's thread bound to the r-th CPU of the list (--pins, in turn)
The process group rendezvous is a file (nothing listens); NVLink multicast is off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (overlap)


def local_cpus(dev: torch.device) -> set[int]:
    """CPUs on the GPU's NUMA node that this process may use (empty if sysfs does not say)."""
    pr = torch.cuda.get_device_properties(dev)
    try:
        bus = f"{pr.pci_domain_id:04x}:{pr.pci_bus_id:02x}:{pr.pci_device_id:02x}.0"
    except AttributeError:  # older torch: ask the driver (identical GPUs: CUDA's order is the PCI order)
        import subprocess

        q = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader", "-i", str(dev.index)],
                           capture_output=True, text=True).stdout.strip().lower()
        bus = q[-12:] if q else "none"
    path = f"/sys/bus/pci/devices/{bus}/local_cpulist"
    try:
        text = open(path).read().strip()
    except OSError:
        return set()
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus & os.sched_getaffinity(0)


def _cpu_now() -> int:
    import ctypes

    return ctypes.CDLL(None).sched_getcpu()


def _med(xs) -> float:
    return round(statistics.median(xs), 2)


def none_loop(r, b: int, p: int, n: int, wait: str, copies: bool) -> dict:
    """The `none` loop of Runner._generate (decode steps only, from position p), timed in parts."""
    buf = r.buffers(b)
    steps = r.decode_graphs(b, False)
    host_tok = buf["host_tok"]
    now = time.perf_counter_ns
    parts = {k: [] for k in ("inputs_us", "replay_us", "readback_us", "wait_us", "tolist_us", "turn_us")}
    marks, starts = [], []
    buf["pos"].fill_(p)
    torch.cuda.synchronize()
    for i in range(n - 1):
        t0 = now()
        if copies:
            r.copy_inputs(buf, (i - 1) % 2, p + i)
        src = 0 if copies else i % 2
        t1 = now()
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        steps[src]()
        t2 = now()
        s1.record()
        host_tok[i % 2].copy_(buf["tok"][1 - src], non_blocking=True)
        ev = torch.cuda.Event(blocking=wait == "blocking")
        ev.record()
        t3 = now()
        if wait == "poll":
            while not ev.query():
                pass
        else:
            ev.synchronize()
        t4 = now()
        host_tok[i % 2].tolist()
        t5 = now()
        marks.append((s0, s1))
        starts.append(t0)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k].append(v / 1e3)
    torch.cuda.synchronize()
    parts["turn_us"] = [(starts[i + 1] - starts[i]) / 1e3 for i in range(len(starts) - 1)]
    gaps = [marks[i][1].elapsed_time(marks[i + 1][0]) * 1e3 for i in range(len(marks) - 1)]
    gpu = [s.elapsed_time(e) * 1e3 for s, e in marks]
    skip = 2  # the first steps warm caches
    out = {k: _med(v[skip:]) for k, v in parts.items()}
    out.update(step_gpu_us=_med(gpu[skip:]), gap_us=_med(gaps[skip:]), gap_us_p90=round(sorted(gaps[skip:])[
        int(0.9 * (len(gaps) - skip))], 2))
    return out


def back_to_back_us(r, b: int, p: int, n: int) -> float:
    """Decode steps replayed with no host wait in between: the step's time without any turn-around."""
    steps = r.decode_graphs(b, False)
    buf = r.buffers(b)
    times = []
    for _ in range(3):
        buf["pos"].fill_(p)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(n - 1):
            steps[i % 2]()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (n - 1))
    return _med(times)


def _rank(rank: int, world: int, store: str, a: argparse.Namespace) -> None:
    from llm_bench.engine import random_prompts
    from overlap.config import EngineConfig
    from overlap.runner import Runner

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                device_id=dev)
    b, p, n = a.batch_size, a.prompt_len, a.max_tokens
    cfg = EngineConfig(model=a.model, tp=world, device="cuda", batch_sizes=(b,), max_seq=p + n).resolved()
    r = Runner(rank, world, dev, cfg)
    prompts = random_prompts(b, p, r.model.cfg.vocab_size, 0)
    cpus = local_cpus(dev)

    def emit(variant: str, rec: dict) -> None:
        print(json.dumps({"tp": world, "rank": rank, "variant": variant, **rec}), flush=True)

    def engine_loop() -> dict:
        gens = [r.generate(prompts, n) for _ in range(a.reps + 1)][1:]
        tpot = [(g["token_ns"][-1] - g["token_ns"][1]) / (n - 2) / 1e3 for g in gens]
        rec = {"tpot_us": _med(tpot)}
        if rank == 0:
            rec["step_gap_us"] = _med(g["step_gap_us_p50"] for g in gens)
        return rec

    emit("engine", {**engine_loop(), "back_to_back_us": back_to_back_us(r, b, p, n),
                    "allowed_cpus": len(os.sched_getaffinity(0)), "local_cpus": sorted(cpus)[:4] + ["..."],
                    "n_local": len(cpus), "cpu_now": _cpu_now(), "allreduce": r.describe().get("allreduce")})
    allowed = os.sched_getaffinity(0)
    for plan in a.pins:
        # "-": the thread may run anywhere it could at start; "A,B": rank r's thread on CPU number r.
        where = allowed if plan == "-" else {int(plan.split(",")[rank])}
        os.sched_setaffinity(0, where)
        tag = "" if plan == "-" else f"-pin{plan}"
        emit("engine" + tag, {**engine_loop(), "cpu_now": _cpu_now()})
        for wait, copies, name in (("poll", True, "loop-poll"), ("sync", True, "loop"),
                                   ("blocking", True, "loop-blocking"), ("poll", False, "loop-nocopy")):
            if plan != a.pins[0] and name in ("loop-blocking", "loop-nocopy"):
                continue
            for _ in range(a.reps):
                rec = none_loop(r, b, p, n, wait, copies)
            emit(name + tag, rec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pins", nargs="+", default=["-"],
                    help='CPU placements in turn: "-" (anywhere allowed) or "A,B,..." (rank r on CPU r-th)')
    a = ap.parse_args()
    from llm_bench.procs import NCCL_SAFE_ENV

    os.environ.update(NCCL_SAFE_ENV)
    for world in a.tp:
        if not 1 <= world <= torch.cuda.device_count():
            print(f"host_gap: --tp {world}: {torch.cuda.device_count()} GPUs visible", file=sys.stderr)
            return 2
    for world in a.tp:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), a), nprocs=world,
                               start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
