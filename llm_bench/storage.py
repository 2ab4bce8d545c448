"""Stored results: pytest-benchmark runs, picked the way pytest-benchmark picks them (a file path, an id
like `0001` in any machine folder under the storage, or the latest run when nothing is named), and
the live results file (`results/runs.jsonl`) every finished benchmark is appended to as it finishes:
each session in it is one run (`runs.jsonl#SESSION` names one). Every run is checked where it is read,
so the commands never meet a string where a number belongs, nor a number that cannot be true (a time
not above 0, a share outside [0, 1], an infinity); the columns derived across benchmarks
(metrics.DERIVED) are not read from the file but derived again from the checked fields, as the plugin
derived them. Outputs go to a file or, for `-`, to stdout."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
from datetime import datetime, timezone

from .columns import COLUMNS
from .metrics import DERIVED, derive_columns, is_number


class DataError(Exception):
    """A missing, unreadable or corrupt input file, naming it, or a malformed argument: `llm-bench`
    prints it on one line and exits 2 (cli.main)."""


# -- finding runs -----------------------------------------------------------------------------------
def _listing(paths: list[str], limit: int = 4) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def find_runs(specs: list[str], storage: str = ".benchmarks") -> list[str]:
    """The file (or `file#session`) each spec names, exactly one per spec: a folder, or an id that
    matches several runs, is refused naming them rather than one picked."""
    if not specs:
        return [_latest(storage)]
    out = []
    for spec in specs:
        base = spec.rsplit("#", 1)[0]
        if os.path.isdir(spec):
            inside = sorted(glob.glob(os.path.join(spec, "*.json")) + glob.glob(os.path.join(spec, "*.jsonl")))
            raise DataError(f"'{spec}' is a folder, not a run: name a file in it"
                            + (f" ({len(inside)} there: {_listing(inside)})" if inside else ""))
        if os.path.isfile(spec) or ("#" in spec and os.path.isfile(base)):
            out.append(spec)
            continue
        hits = sorted(set(glob.glob(os.path.join(storage, "*", f"{spec}*.json")) +
                          glob.glob(os.path.join(storage, "**", spec), recursive=True)))
        files = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"run '{spec}' not found (not a file, nor an id under {storage}/)")
        if not files:
            raise DataError(f"'{spec}' names a folder under {storage}/ ({_listing(hits)}), not a run")
        if len(files) > 1:
            raise DataError(f"run '{spec}' matches {len(files)} runs under {storage}/: {_listing(files)}; "
                            f"name one by its path")
        out.append(files[0])
    return out


def _run_datetime(path: str) -> datetime | None:
    """When pytest-benchmark wrote the run at `path` (its `datetime` field), None if it cannot be read."""
    try:
        when = datetime.fromisoformat(_loads(_read(path))["datetime"])
    except (DataError, TypeError, KeyError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _latest(storage: str) -> str:
    """The latest numbered run under `storage`: the highest number of its machine folder (as
    pytest-benchmark counts), and across machine folders the one whose `datetime` is latest. A tie,
    or a run without a readable datetime among the candidates, is refused naming them."""
    files = glob.glob(os.path.join(storage, "*", "[0-9][0-9][0-9][0-9]_*.json"))
    if not files:
        raise DataError(f"no numbered runs (NNNN_*.json, as --benchmark-autosave writes them) under {storage}/*/ "
                        "to take the latest from: name the runs (files, or ids like 0001)")
    tops: dict[str, str] = {}
    for f in files:
        folder = os.path.dirname(f)
        tops[folder] = max(tops.get(folder, ""), f, key=os.path.basename)
    if len(tops) == 1:
        return next(iter(tops.values()))
    when = {f: _run_datetime(f) for f in tops.values()}
    dated = sorted((w, f) for f, w in when.items() if w is not None)
    undated = sorted(f for f, w in when.items() if w is None)
    if undated:
        raise DataError(f"which run under {storage}/ is the latest? the latest of each machine folder: "
                        f"{_listing(sorted(tops.values()))}; {_listing(undated)} has no readable 'datetime': "
                        f"name one by its path")
    ties = [f for when, f in dated if when == dated[-1][0]]
    if len(ties) > 1:
        raise DataError(f"which run under {storage}/ is the latest? {_listing(ties)} have the same datetime "
                        f"{dated[-1][0].isoformat()}: name one by its path")
    return dated[-1][1]


# -- reading and checking runs ----------------------------------------------------------------------
_STATS = re.compile(r"_(p\d+|mean|std|min|max)$")
_SAMPLES = re.compile(r"_(ms|us|per_s)(_comm_free)?_rounds$")  # per-round samples: tpot_ms_rounds, ...
_TIME = re.compile(r"_(ms|us)(_|$)")          # a time: ttft_ms_p50, round_ms, tpot_ms_comm_free, ...
_MAY_BE_ZERO = re.compile(r"(_std$|^step_gap_|^transport_)")  # a spread, an idle gap, an overhead: >= 0
_RATE = re.compile(r"_per_s(_|$)")            # tok_per_s, decode_tok_per_s, ...: above 0
_COUNTS = ("tp", "batch_size", "prompt_len", "output_len")
NUMBER_KEYS = {c.key for c in COLUMNS} - set(DERIVED) | {"tok_per_s", "decode_tok_per_s", "message_bytes"}
LIST_KEYS = ("token_ms_timeline",)  # a list of numbers too: TTFT, then each gap (>= 0)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _float(v) -> float | None:
    """`v` as a float; None where it is not a number or too large for one."""
    try:
        return float(v) if is_number(v) else None
    except OverflowError:
        return None


def _range(k: str) -> tuple[float, float, bool, str] | None:
    """(low, high, low allowed, what that means) for key `k`; None where only finiteness is asked."""
    if k == "mbu":
        return 0.0, 1.0, False, "MBU is in (0, 1]"
    if k.endswith("_share"):
        return 0.0, 1.0, True, "a share is in [0, 1]"
    if k in LIST_KEYS or _MAY_BE_ZERO.search(k):
        return 0.0, math.inf, True, "a gap or a spread is >= 0"
    if _TIME.search(k) or _RATE.search(k):
        return 0.0, math.inf, False, "a time or a rate is above 0"
    return None


def _bad_value(k: str, v) -> str | None:
    """Why extra_info value `v` of key `k` cannot be a measurement (None when it can)."""
    if k in _COUNTS:
        return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "not a positive integer"
    rng = _range(k)
    listed = bool(_SAMPLES.search(k)) or k in LIST_KEYS or (isinstance(v, list) and rng is not None)
    if listed and not isinstance(v, list):
        return "not a list of numbers"
    strict = rng is not None or k in NUMBER_KEYS or listed  # NaN refused too
    if not (strict or _STATS.search(k) or is_number(v)):
        return None  # not a number the commands read (a name, a flag, an option)
    a = "a list of " if listed else "a "
    for x in v if listed else [v]:
        f = _float(x)
        if not is_number(x):
            return f"not {a}number" + ("s" if listed else "")
        if f is None or math.isinf(f) or (strict and math.isnan(f)):
            return f"not {a}finite number" + ("s" if listed else "")
        if rng is not None and not (rng[0] < f <= rng[1] or (rng[2] and f == rng[0])):
            return (f"holding {_short(x)}, " if listed else "") + f"out of range ({rng[3]})"
    return None


def _check_extra(where: str, e: dict) -> None:
    """The extra_info values the commands read as numbers are numbers that can be true: finite (NaN
    only in columns the commands do not read, such as an NVML column a GPU does not report), times and
    rates above 0 (spreads and gaps >= 0), shares in [0, 1], MBU in (0, 1], per-round samples lists of
    such numbers, TP, batch and lengths positive integers. The derived columns are skipped: check_run
    derives them again."""
    for k, v in e.items():
        if k in DERIVED or k.removesuffix("_note") in DERIVED:
            continue
        if k.endswith("_note") or k in ("overlap", "model", "engine"):
            why = None if isinstance(v, str) else "not a string"
        else:
            why = _bad_value(k, v)
        if why:
            raise DataError(f"{where}: extra_info '{k}' is {_short(v)}, {why}")


QUANTILES = ("min", "p25", "p50", "p75", "p90", "p99", "max")  # the order a distribution's summaries keep


def _check_order(where: str, e: dict) -> None:
    """The summaries of one distribution are in order (min <= p25 <= ... <= max): a p50 above the max
    of the same values cannot be a measurement."""
    for prefix in sorted({k.rsplit("_", 1)[0] for k in e if k.rsplit("_", 1)[-1] in QUANTILES}):
        have = [(f"{prefix}_{q}", e[f"{prefix}_{q}"]) for q in QUANTILES if is_number(e.get(f"{prefix}_{q}"))]
        for (ka, a), (kb, b) in zip(have, have[1:]):
            if a > b:
                raise DataError(f"{where}: extra_info '{ka}' ({_short(a)}) is above '{kb}' ({_short(b)}): "
                                "summaries of one distribution out of order")


def check_run(path: str, d) -> dict:
    """`d` as a run, or a DataError naming what is wrong and where."""
    if not isinstance(d, dict) or not isinstance(d.get("benchmarks"), list):
        raise DataError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list)")
    mi = d.get("machine_info")
    if mi is not None and not isinstance(mi, dict):
        raise DataError(f"{path}: 'machine_info' is {_short(mi)}, not an object")
    gpu = (mi or {}).get("gpu")
    if gpu is not None and not isinstance(gpu, dict):
        raise DataError(f"{path}: 'machine_info.gpu' is {_short(gpu)}, not an object")
    if gpu and gpu.get("fingerprint") is not None and not isinstance(gpu["fingerprint"], str):
        raise DataError(f"{path}: 'machine_info.gpu.fingerprint' is {_short(gpu['fingerprint'])}, not a string")
    dropped = d.get("llm_bench_dropped", [])
    if not isinstance(dropped, list) or not all(isinstance(n, str) for n in dropped):
        raise DataError(f"{path}: 'llm_bench_dropped' is {_short(dropped)}, not a list of names")
    if not d["benchmarks"]:
        why = f"interrupted: {', '.join(dropped)} not stored" if dropped else "every benchmark skipped or deselected?"
        raise DataError(f"{path}: holds no benchmark ({why})")
    for i, b in enumerate(d["benchmarks"]):
        if not isinstance(b, dict):
            raise DataError(f"{path}: benchmark {i} is {_short(b)}, not an object")
        for k in ("name", "fullname"):
            if not isinstance(b.get(k), str) or not b[k]:
                raise DataError(f"{path}: benchmark {i} has no '{k}' (a string)")
        e = b.setdefault("extra_info", {})
        if not isinstance(e, dict):
            raise DataError(f"{path}: {b['name']}: 'extra_info' is {_short(e)}, not an object")
        _check_extra(f"{path}: {b['name']}", e)
        _check_order(f"{path}: {b['name']}", e)
    derive_columns(d["benchmarks"])
    d["_path"] = path
    return d


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a run file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not text (not UTF-8: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


EMPTY = "empty: the run stored nothing (interrupted, all skipped, or a usage error)"


def _loads(text: str):
    """json.loads, with what a hostile file makes it raise besides JSONDecodeError (nesting deeper than
    the interpreter's stack, an integer of thousands of digits) as a ValueError saying so."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion..."
        raise ValueError(str(e).split(":")[0]) from None


def _records(path: str, text: str) -> list[dict]:
    """The records of a live results file. A damaged line (cut short by a crash while writing, perhaps
    with a later session's record appended to it) is skipped with one warning naming the lines; a line
    that is JSON but not a record is an error (not our file)."""
    out, damaged = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = _loads(line)
        except ValueError:
            damaged.append(n)
            continue
        if not isinstance(r, dict) or not isinstance(r.get("session"), str):
            raise DataError(f"{path} line {n}: not a runs.jsonl record (no 'session' string)")
        out.append(r)
    if damaged:
        lines = f"line{'s' if len(damaged) > 1 else ''} {_listing([str(n) for n in damaged], 5)}"
        if not out:
            raise DataError(f"{path}: no readable record ({lines} not JSON)")
        print(f"llm-bench: warning: {path}: skipped {lines}, not JSON (cut short by a crash while writing?)",
              file=sys.stderr)
    return out


def _sessions(path: str, text: str, want: str | None) -> list[dict]:
    """One run per session of a runs.jsonl file (a later record of the same benchmark replaces an
    earlier one), checked and with the columns derived across its benchmarks, as for a JSON file."""
    by: dict[str, dict[str, dict]] = {}
    for r in _records(path, text):
        by.setdefault(r["session"], {})[str(r.get("fullname"))] = {
            "name": r.get("name"), "fullname": r.get("fullname"), "extra_info": r.get("extra_info", {})}
    if not by:
        raise DataError(f"{path}: {EMPTY}")
    ids = list(by)
    if want is not None:
        ids = [s for s in ids if s.startswith(want)]
        if len(ids) != 1:
            why = "not found" if not ids else f"is ambiguous ({_listing(ids)})"
            raise DataError(f"{path}: session '{want}' {why}; sessions there: {_listing(list(by))}")
    return [check_run(f"{path}#{s}", {"benchmarks": list(by[s].values()), "llm_bench": {"session": s}})
            for s in ids]


def load_run(spec: str) -> list[dict]:
    """The runs in one file: a pytest-benchmark JSON is one run; a runs.jsonl is one run per session
    (or the one `file#session` names)."""
    path, _, session = spec.rpartition("#") if "#" in spec and not os.path.isfile(spec) else (spec, "", "")
    text = _read(path)
    if path.endswith(".jsonl") or session:
        return _sessions(path, text, session or None)
    if not text.strip():
        raise DataError(f"{path}: {EMPTY}")
    try:
        d = _loads(text)
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError) and e.msg == "Extra data":  # one JSON document per line:
            return _sessions(path, text, None)                            # a live results file, renamed
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return [check_run(path, d)]


def load_runs(specs: list[str], storage: str = ".benchmarks") -> list[dict]:
    """The runs `specs` name (latest when empty), loaded and checked."""
    return [run for p in find_runs(specs, storage) for run in load_run(p)]


def fingerprint(run: dict) -> str | None:
    return ((run.get("machine_info") or {}).get("gpu") or {}).get("fingerprint")


def run_labels(runs: list[dict]) -> list[str]:
    """Short names that tell the runs apart: the words of their paths that not all of them share
    (`H200x2-tp` and `H200x4-overlap-tp4` for .benchmarks/gpu/H200x2/20261126-s5-llama3-8b-tp.json and
    .benchmarks/gpu/H200x4/20261126-s5-llama3-8b-overlap-tp4.json), the file's name for one run."""
    if len(runs) == 1:
        return [os.path.basename(runs[0]["_path"]).removesuffix(".json")]
    toks = [[t for t in re.split(r"[-_./#]", r["_path"].removesuffix(".json")) if t] for r in runs]
    common = set.intersection(*map(set, toks))
    labels = ["-".join(t for t in ts if t not in common) or os.path.basename(r["_path"]) for ts, r in zip(toks, runs)]
    if len(set(labels)) < len(labels):  # the same run given twice
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    return labels


# -- live results file --------------------------------------------------------------------------------
def append_record(path: str, record: dict) -> None:
    """Append one finished benchmark to the live results file, durably, so a crash later loses nothing.
    After a crash that cut the last line short, the record starts on a line of its own: the damaged
    line alone is skipped when the file is read, not this record with it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+b") as f:  # appends go to the end whatever the position; reads may look back
        line = json.dumps(record, default=str) + "\n"
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str) -> list[dict]:
    """The records of a live results file: a damaged line is skipped with a warning (`_records`)."""
    return _records(path, _read(path))


# -- outputs ------------------------------------------------------------------------------------------
def write_output(path: str, text: str) -> None:
    """`text` to the file `path`, or to stdout for `-`; a file that cannot be written is a DataError."""
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        with open(path, "w", newline="") as f:
            f.write(text)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def json_safe(v):
    """`v` with NaN and infinities as null: strict JSON for the machine-readable outputs."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v
