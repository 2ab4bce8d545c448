"""Every metric the suite stores, defined once, for the pytest plugin and the CLI alike.

Per benchmark, from per-token timestamps (definitions follow vLLM's benchmarks/serve.py):
- TTFT: submit to first token on the host.   - ITL: every gap between consecutive tokens (between
  streamed chunks where one chunk may carry several tokens, as vLLM's), pooled.
- TPOT: (E2E - TTFT) / (n_out - 1) per request (undefined for 1-token outputs, or every token in one
  streamed chunk: left out).
- E2E: submit to last token.                   - tok/s: output tokens over E2E (batch aggregate).
- MBU: bytes one decode step must read per GPU / TPOT / copy bandwidth measured on the card.
Across benchmarks of one run (`derive_columns`): speedup and scaling efficiency against the smallest
TP, overlap gain against `none`, the communication share from a comm-free variant and the share of
`none`'s communication an overlap mode hides. A number that cannot be true is not stored: the row
gets a `<column>_note` saying why instead; so does a row whose inputs are not finite times above 0
(a broken measurement never becomes a division by zero or a share outside [0, 1]).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

PCTS = (25, 50, 75, 90, 99)  # 25/75 and min/max let the report draw box plots from stored columns


class MeasurementError(AssertionError):
    """A number that cannot be true (e.g. bandwidth use above the measured peak): the measurement is broken."""


def is_number(v) -> bool:
    """An int or float (a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v) -> bool:
    """`v` is a number that converts to a finite float (not NaN, not infinite, not an int too large)."""
    if not is_number(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def positive(v) -> bool:
    """`v` is a finite number above 0: a time, a rate or an efficiency that can be divided by."""
    return finite(v) and v > 0


def request_timings(submit_ns: int, token_ns: list[int], n_out: int | None = None) -> dict:
    """One request: TTFT, ITLs, TPOT and E2E in milliseconds. `token_ns`: when each token reached the
    host; or, where a streamed chunk may carry several tokens (`n_out` tokens in fewer chunks), when
    each chunk did: then ITL is per chunk, as in vLLM's benchmark, and TPOT counts the `n_out` tokens."""
    if not token_ns:
        raise MeasurementError("a request produced no tokens")
    t = np.asarray(token_ns, dtype=np.int64)
    if np.any(np.diff(t) < 0) or t[0] < submit_ns:
        raise MeasurementError("token timestamps go backwards: clocks are mixed up")
    ttft = (t[0] - submit_ns) / 1e6
    e2e = (t[-1] - submit_ns) / 1e6
    n = len(t) if n_out is None else n_out
    if n < len(t):
        raise MeasurementError(f"{len(t)} arrivals for {n} tokens: an arrival without a token")
    # TPOT needs time between the first token and the last: none when every token came in one chunk.
    return {"ttft_ms": ttft, "e2e_ms": e2e, "itl_ms": (np.diff(t) / 1e6).tolist(), "n_out": n,
            "tpot_ms": (e2e - ttft) / (n - 1) if n > 1 and e2e > ttft else None}


def _stats(prefix: str, values, pcts=PCTS, mean=True) -> dict:
    if len(values) == 0:
        return {}
    v = np.asarray(values, dtype=np.float64)
    out = {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()),
           f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())} if mean else {}
    out.update({f"{prefix}_p{p}": float(np.percentile(v, p)) for p in pcts})
    return out


def summarize(rounds: list[list[dict]]) -> dict:
    """Aggregate rounds (each a list of per-request timings, one per request of the batch) into the
    flat float columns stored in extra_info, plus short per-round lists for significance tests."""
    reqs = [r for rnd in rounds for r in rnd]
    ttft = [r["ttft_ms"] for r in reqs]
    itl = [x for r in reqs for x in r["itl_ms"]]
    tpot = [r["tpot_ms"] for r in reqs if r["tpot_ms"] is not None]
    out = _stats("ttft_ms", ttft)
    out.update(_stats("itl_ms", itl))
    if tpot:
        out["tpot_ms_mean"] = float(np.mean(tpot))
        out["tpot_ms_p50"] = float(np.percentile(tpot, 50))
    out["e2e_ms_mean"] = float(np.mean([r["e2e_ms"] for r in reqs]))
    out["e2e_ms_p50"] = float(np.percentile([r["e2e_ms"] for r in reqs], 50))
    # Aggregate throughput: every round's output tokens over that round's wall time (submit to last token).
    per_round_tps = [sum(r["n_out"] for r in rnd) / (max(r["e2e_ms"] for r in rnd) / 1e3) for rnd in rounds]
    out["tok_per_s"] = float(np.mean(per_round_tps))
    out["tok_per_s_per_request"] = float(np.mean([r["n_out"] / (r["e2e_ms"] / 1e3) for r in reqs]))
    if tpot:
        out["decode_tok_per_s"] = float(1e3 / np.percentile(tpot, 50) * len(rounds[0]))
    out["tok_per_s_rounds"] = [float(x) for x in per_round_tps]
    out["ttft_ms_rounds"] = [float(np.mean([r["ttft_ms"] for r in rnd])) for rnd in rounds]
    if tpot:
        out["tpot_ms_rounds"] = [float(np.mean([r["tpot_ms"] for r in rnd])) for rnd in rounds]
    out["n_requests"] = float(len(reqs))
    # One request's per-token latencies (TTFT, then each ITL) from the last round: the report's timeline.
    last = rounds[-1][0]
    out["token_ms_timeline"] = [float(last["ttft_ms"])] + [float(x) for x in last["itl_ms"]]
    return out


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_len: int,
                          output_len: int) -> float:
    """Bytes one decode step must read on one GPU: its weight shard plus the KV cache of every
    sequence, averaged over the decode steps (step i attends to prompt_len + i tokens)."""
    avg_ctx = prompt_len + output_len / 2
    return float(weight_bytes + kv_bytes_per_token * batch * avg_ctx)


def bandwidth_use(bytes_per_step: float, tpot_ms: float, peak_bytes_per_s: float) -> float:
    """MBU = bytes per step / TPOT / measured peak copy bandwidth; above 1 is a broken measurement."""
    if not (positive(tpot_ms) and positive(peak_bytes_per_s)):
        raise MeasurementError(f"bandwidth use from TPOT {tpot_ms!r} ms and peak {peak_bytes_per_s!r} B/s: "
                               "both must be finite and above 0")
    mbu = bytes_per_step / (tpot_ms / 1e3) / peak_bytes_per_s
    if mbu > 1.0:
        raise MeasurementError(
            f"bandwidth use {mbu:.2f} > 1.0 of the measured peak ({peak_bytes_per_s / 1e12:.2f} TB/s): "
            f"{bytes_per_step / 1e9:.3f} GB per step in {tpot_ms:.3f} ms cannot be; a timestamp or a byte "
            f"count is wrong")
    return float(mbu)


# -- communication shares ------------------------------------------------------------------------------
def comm_share(t: float, t_comm_free: float) -> tuple[float | None, str | None]:
    """Share of a step that is exposed communication: (T - T_comm_free) / T, T_comm_free from the same
    schedule with the collectives as no-ops. Both in ms. (None, why) when the comm-free variant was not
    faster, or when either is not a finite time above 0."""
    if not (positive(t) and positive(t_comm_free)):
        return None, f"times {t!r} ms and {t_comm_free!r} ms (comm-free): not both finite and above 0"
    if t_comm_free > t:
        return None, (f"the comm-free variant ({t_comm_free:.4g} ms) was slower than the real run "
                      f"({t:.4g} ms): no communication share can be read from that")
    return (t - t_comm_free) / t, None


def hidden_share(mode: float, mode_cf: float, none: float, none_cf: float) -> tuple[float | None, str | None]:
    """Share of `none`'s exposed communication that a mode no longer exposes:
    1 - (T_mode - T_mode_comm_free) / (T_none - T_none_comm_free). In [0, 1] where defined; (None, why)
    where there is nothing to hide or the mode exposes more (or less than no) communication, or where a
    time is not finite and above 0."""
    if not all(positive(x) for x in (mode, mode_cf, none, none_cf)):
        return None, (f"times {mode!r}, {mode_cf!r} (comm-free) ms and none's {none!r}, {none_cf!r} ms: "
                      "not all finite and above 0")
    exposed_none, exposed_mode = none - none_cf, mode - mode_cf
    if exposed_none <= 0:
        return None, f"`none` exposes no communication ({none:.4g} ms vs {none_cf:.4g} ms comm-free)"
    if exposed_mode < 0:
        return None, (f"the mode ran faster ({mode:.4g} ms) than its own comm-free variant ({mode_cf:.4g} ms): "
                      "the difference is noise, not hidden communication")
    if exposed_mode > exposed_none:
        return None, (f"the mode exposes more communication ({exposed_mode:.4g} ms) than `none` "
                      f"({exposed_none:.4g} ms): nothing is hidden")
    return 1 - exposed_mode / exposed_none, None


# -- columns derived across the benchmarks of one run --------------------------------------------------
TPOT, TTFT = "tpot_ms_p50", "ttft_ms_p50"
# (column, its time column, its comm-free time column): decode from TPOT, prefill from TTFT.
SHARES = (("comm_share", TPOT, "tpot_ms_comm_free"), ("prefill_comm_share", TTFT, "ttft_ms_comm_free"))
HIDDEN = (("comm_hidden_share", TPOT, "tpot_ms_comm_free"), ("prefill_comm_hidden_share", TTFT, "ttft_ms_comm_free"))
GAINS = (("overlap_gain", TPOT), ("prefill_overlap_gain", TTFT))
DERIVED = ("speedup", "throughput_ratio", "scaling_efficiency", "scaling_base_tp") + \
    tuple(c for c, *_ in SHARES + HIDDEN + GAINS)


def func_name(row: dict) -> str:
    return row["name"].split("[")[0]


def _key(v):
    """`v` as part of a grouping key: a list or dict (a malformed row) by its repr, not a TypeError."""
    return v if v is None or isinstance(v, (str, int, float)) else repr(v)


def _lengths(e: dict) -> tuple:
    return tuple(_key(e.get(k)) for k in ("engine", "model", "batch_size", "prompt_len", "output_len"))


def _tp(e: dict) -> int | None:
    tp = e.get("tp")
    return tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 0 else None


def _set(e: dict, column: str, value_and_why: tuple) -> None:
    value, why = value_and_why
    if value is not None:
        e[column] = float(value)
    elif why:
        e[column + "_note"] = why


def derive_columns(rows: list[dict]) -> None:
    """Fill the derived columns of each row's extra_info in place. They depend only on raw fields and
    are rewritten each time, so `pytest_benchmark_update_json` may run twice with the same result.

    scaling: base = smallest TP measured in the same run for the same test, engine, model, batch,
    lengths and overlap mode; speedup = TPOT(base) / TPOT(tp); efficiency = speedup * base / tp.
    overlap: gain = T(none) / T(mode) - 1 for the same TP, batch and lengths (T: TPOT for decode,
    TTFT for prefill); hidden share as `hidden_share`, from the mode's and `none`'s comm-free runs."""
    for r in rows:
        e = r.get("extra_info") or {}
        for k in DERIVED:
            e.pop(k, None)
            e.pop(k + "_note", None)
        for column, t, cf in SHARES:
            if t in e and cf in e:
                _set(e, column, comm_share(e[t], e[cf]))
    groups = defaultdict(list)
    for r in rows:
        e = r.get("extra_info") or {}
        if "tensor_parallel" in func_name(r) and "tp" in e and TPOT in e:
            if _tp(e) and positive(e[TPOT]):
                groups[(func_name(r), _key(e.get("overlap"))) + _lengths(e)].append(r)
            else:
                e["scaling_efficiency_note"] = f"tp {e['tp']!r}, TPOT {e[TPOT]!r}: no speedup from these"
    for members in groups.values():
        base = min(members, key=lambda r: r["extra_info"]["tp"])["extra_info"]
        for r in members:
            e = r["extra_info"]
            e["scaling_base_tp"] = base["tp"]
            e["speedup"] = base[TPOT] / e[TPOT]
            e["scaling_efficiency"] = e["speedup"] * base["tp"] / e["tp"]
            if positive(base.get("tok_per_s")) and positive(e.get("tok_per_s")):
                e["throughput_ratio"] = e["tok_per_s"] / base["tok_per_s"]
    nones = {}
    for r in rows:
        e = r.get("extra_info") or {}
        if "overlap" in func_name(r) and e.get("overlap") == "none":
            nones[(func_name(r), _key(e.get("tp"))) + _lengths(e)] = e
    for r in rows:
        e = r.get("extra_info") or {}
        ref = nones.get((func_name(r), _key(e.get("tp"))) + _lengths(e))
        if ref is None or "overlap" not in func_name(r):
            continue
        for column, t in GAINS:
            if t in e and t in ref:
                if positive(e[t]) and positive(ref[t]):
                    e[column] = ref[t] / e[t] - 1
                else:
                    e[column + "_note"] = f"{t} {e[t]!r} vs none's {ref[t]!r}: not both finite and above 0"
        for column, t, cf in HIDDEN:
            if e is not ref and all(k in x for x in (e, ref) for k in (t, cf)):
                _set(e, column, hidden_share(e[t], e[cf], ref[t], ref[cf]))
