"""`llm-bench trace TRACE.json...`: what a `--llm-enable-trace` file says, in numbers: queue, prefill and
decode-step times of the requests; each rank's step time and how far apart the ranks finish a step
(skew: a slow or late rank stalls every all-reduce); the comm-free variant's step and the
communication share it implies; NVML utilisation and power per GPU. The same reading one would do by
eye in Perfetto, for every trace of a run at once."""
from __future__ import annotations

import json
import math
import reprlib
import sys
from collections import defaultdict

import numpy as np

from .metrics import comm_share, finite
from .storage import DataError, json_safe
from .tracefile import PID_CF, PID_GPU, PID_RANKS, PID_REQ


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="summarise --llm-enable-trace files: step times, rank skew, comm share, GPUs")
    p.add_argument("traces", nargs="+", help="trace JSON files (results/traces/*.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


EXACT_US = 2 ** 53  # microseconds a float64 still counts one by one (~285 years)


class NotOurs(DataError):
    """A readable trace that --llm-enable-trace did not write (MLC's, torch.profiler's)."""


def _load(path: str) -> list[dict]:
    try:
        with open(path) as f:
            text = f.read()
        if not text.strip():
            raise DataError(f"{path}: empty: no trace was written (interrupted?)")
        d = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: cannot read trace (nested too deeply)") from None
    except (OSError, ValueError) as e:  # a 5000-digit integer: "Exceeds the limit (4300 digits) ..."
        raise DataError(f"{path}: cannot read trace ({str(e).split(': value has')[0]})") from None
    events = d.get("traceEvents") if isinstance(d, dict) else None
    ours = isinstance(events, list) and any(
        e.get("ph") == "M" and e.get("pid") == PID_REQ and isinstance(e.get("args"), dict)
        and e["args"].get("name") == "requests"
        for e in events if isinstance(e, dict))
    if not ours:
        raise NotOurs(f"{path}: not a parallel-llm-bench trace (MLC's own and --llm-torch-profile traces "
                      "open in https://ui.perfetto.dev)")
    for i, e in enumerate(events):
        why = _bad_event(e)
        if why:
            raise DataError(f"{path}: event {i} {why}: not what --llm-enable-trace writes")
    why = _not_one_session(events)
    if why:
        raise DataError(f"{path}: {why}")
    return events


def _not_one_session(events: list[dict]) -> str | None:
    """Why `events` are not one benchmark's trace of one session (None when they are): each file holds
    one `requests` track and at least one round; each rank's step of a round appears once."""
    heads = sum(1 for e in events if e.get("ph") == "M" and e.get("pid") == PID_REQ
                and (e.get("args") or {}).get("name") == "requests")
    if heads > 1:
        return (f"{heads} traces in one file (one per session and benchmark is what --llm-enable-trace writes; "
                "merged files mix sessions whose clocks and rounds do not line up): give each file")
    if not any(e.get("ph") == "X" and e.get("pid") == PID_REQ and e.get("name") == "batch" for e in events):
        return "no request rounds ('batch' spans): nothing was measured in this trace"
    seen = set()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") == PID_RANKS:
            a = e.get("args") or {}
            key = (e["tid"], a.get("round"), a.get("step"))
            if key in seen:
                return (f"rank {e['tid'] - 1}'s step {a.get('step')} of round {a.get('round')} appears twice: "
                        "traces of several sessions merged? give each file")
            seen.add(key)
    return None


def _bad_event(e) -> str | None:
    """Why event `e` cannot be read as one of ours (None when it can): the fields `summarize` uses."""
    if not isinstance(e, dict):
        return f"is {type(e).__name__}, not an object"
    ph, pid = e.get("ph"), e.get("pid")
    if ph == "X" and pid in (PID_REQ, PID_CF, PID_RANKS):
        for k in ("ts", "dur"):
            if not finite(e.get(k)):
                return f"({reprlib.repr(e.get('name'))}) has {k} {reprlib.repr(e.get(k))}, not a finite number"
            if abs(e[k]) > EXACT_US:
                return (f"({reprlib.repr(e.get('name'))}) has {k} {reprlib.repr(e.get(k))}: beyond 2**53 us, where "
                        "a float no longer counts microseconds")
        if e["dur"] < 0:
            return f"({reprlib.repr(e.get('name'))}) has dur {e['dur']!r}: a span cannot last less than 0"
        if not isinstance(e.get("name"), str):
            return "has no name"
        tid = e.get("tid")
        if pid == PID_RANKS and not (isinstance(tid, int) and not isinstance(tid, bool) and tid >= 1):
            return f"(rank step) has tid {e.get('tid')!r}, not a rank number >= 1"
        args = e.get("args", {})
        if not isinstance(args, dict):
            return f"has args {args!r}, not an object"
        if pid == PID_RANKS and not all(isinstance(args.get(k), (int, type(None))) for k in ("round", "step")):
            return f"(rank step) has args {args!r}: round and step are not integers"
    elif ph == "C" and pid == PID_GPU:
        if not isinstance(e.get("name"), str):
            return f"(GPU counter) has name {reprlib.repr(e.get('name'))}, not a string"
        args = e.get("args")  # NaN: a column the GPU does not report (older traces); infinity: broken
        if not isinstance(args, dict) or not all(finite(v) or v != v for v in args.values()):
            return f"(GPU counter) has args {reprlib.repr(args)}, not finite numbers"
    return None


def _ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) / 1e3 if values else None


def summarize(events: list[dict]) -> dict:
    spans: dict[tuple, list[float]] = defaultdict(list)
    rank_steps: dict[int, list[float]] = defaultdict(list)
    ends: dict[tuple, list[float]] = defaultdict(list)
    gpus: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in (PID_REQ, PID_CF):
            spans[(e["pid"], e["name"])].append(float(e["dur"]))
        elif e.get("ph") == "X" and e.get("pid") == PID_RANKS:
            rank_steps[e["tid"] - 1].append(float(e["dur"]))
            a = e.get("args") or {}
            ends[(a.get("round"), a.get("step"))].append(float(e["ts"]) + float(e["dur"]))
        elif e.get("ph") == "C" and e.get("pid") == PID_GPU:
            for k, v in (e.get("args") or {}).items():
                if not math.isnan(v):
                    gpus[e["name"]][k].append(float(v))
    decode, cf = spans[(PID_REQ, "decode")], spans[(PID_CF, "decode")]
    out = {"rounds": len(spans[(PID_REQ, "batch")]), "queue_ms_p50": _ms(spans[(PID_REQ, "queue")], 50),
           "prefill_ms_p50": _ms(spans[(PID_REQ, "prefill")], 50), "decode_step_ms_p50": _ms(decode, 50),
           "decode_step_ms_p99": _ms(decode, 99), "comm_free_step_ms_p50": _ms(cf, 50)}
    if decode and cf:  # spans are in microseconds; the share and its note in milliseconds
        share, why = comm_share(float(np.median(decode)) / 1e3, float(np.median(cf)) / 1e3)
        out["comm_share" if share is not None else "comm_share_note"] = share if share is not None else why
    out["rank_step_ms_p50"] = {f"rank {r}": _ms(v, 50) for r, v in sorted(rank_steps.items())}
    skews = [max(v) - min(v) for v in ends.values() if len(v) > 1]
    if skews:
        out["rank_skew_us_p50"], out["rank_skew_us_max"] = float(np.median(skews)), float(max(skews))
    out["gpus"] = {g: {f"{k}_mean": float(np.mean(v)) for k, v in sorted(d.items())} for g, d in sorted(gpus.items())}
    return out


def _text(path: str, s: dict) -> str:
    lines = [path]
    for k, v in s.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                shown = ", ".join(f"{a} {b:.1f}" for a, b in vv.items()) if isinstance(vv, dict) else f"{vv:.3f}"
                lines.append(f"  {k.replace('_', ' ')}: {kk}: {shown}")
        elif v is None:
            continue
        elif k == "comm_share":
            lines.append(f"  comm share: {v:.1%}")
        else:
            lines.append(f"  {k.replace('_', ' ')}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return "\n".join(lines)


def run(a) -> int:
    result, skipped = {}, []
    for p in a.traces:  # a glob over results/traces/ also meets other tools' traces: skip those
        try:
            result[p] = summarize(_load(p))
        except NotOurs as e:  # unreadable files (DataError) end the command in cli.main
            skipped.append(str(e))
    if not result:
        raise DataError(skipped[0] if len(skipped) == 1 else
                        f"none of the {len(skipped)} files is a parallel-llm-bench trace (MLC's own and "
                        "--llm-torch-profile traces open in https://ui.perfetto.dev)")
    for why in skipped:
        print(f"llm-bench trace: skipped {why}", file=sys.stderr)
    if a.json:
        print(json.dumps(json_safe(result), indent=1))
    else:
        print("\n".join(_text(p, s) for p, s in result.items()))
    return 0
