"""Stored results: pytest-benchmark runs, picked the way pytest-benchmark picks them (a file path, an id
like `0001` in any machine folder under the storage, or the latest run when nothing is named), and
the live results file (`results/runs.jsonl`) every finished benchmark is appended to as it finishes:
each session in it is one run (`runs.jsonl#SESSION` names one). Every run is checked where it is read,
so the commands never meet a string where a number belongs; and outputs go to a file or, for `-`,
to stdout."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import sys

from .columns import COLUMNS
from .metrics import DERIVED, derive_columns


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
        files = sorted(glob.glob(os.path.join(storage, "*", "[0-9][0-9][0-9][0-9]_*.json")),
                       key=lambda p: (os.path.basename(p), p))
        if not files:
            raise DataError(f"no stored runs under {storage}/ (run pytest with --benchmark-autosave, "
                            f"or name a run file)")
        return [files[-1]]
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


# -- reading and checking runs ----------------------------------------------------------------------
_STATS = re.compile(r"_(p\d+|mean|std|min|max)$")
_SAMPLES = re.compile(r"_(ms|us|per_s)(_comm_free)?_rounds$")  # per-round samples: tpot_ms_rounds, ...
NUMBER_KEYS = {c.key for c in COLUMNS} | set(DERIVED) | {"tok_per_s", "decode_tok_per_s", "message_bytes"}
LIST_KEYS = ("token_ms_timeline",)  # a list of numbers too


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check_extra(where: str, e: dict) -> None:
    """The extra_info values the commands read as numbers are numbers (NaN included: the commands
    say what a NaN means where they meet one); tp and batch size are integers."""
    for k, v in e.items():
        if _SAMPLES.search(k) or k in LIST_KEYS:
            if not isinstance(v, list) or not all(is_number(x) for x in v):
                raise DataError(f"{where}: extra_info '{k}' is {_short(v)}, not a list of numbers")
        elif k in ("tp", "batch_size"):
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise DataError(f"{where}: extra_info '{k}' is {_short(v)}, not a positive integer")
        elif (k in NUMBER_KEYS or _STATS.search(k)) and not is_number(v):
            raise DataError(f"{where}: extra_info '{k}' is {_short(v)}, not a number")
        elif k in ("overlap", "model", "engine") and not isinstance(v, str):
            raise DataError(f"{where}: extra_info '{k}' is {_short(v)}, not a string")


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


def _records(path: str, text: str) -> list[dict]:
    """The records of a live results file. A last line cut short (a crash while writing) is skipped
    with a warning; a bad line anywhere else is an error."""
    lines = [(n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"llm-bench: warning: {path} line {n} is cut short (a crash while writing?): skipped",
                      file=sys.stderr)
                continue
            raise DataError(f"{path} line {n}: not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("session"), str):
            raise DataError(f"{path} line {n}: not a runs.jsonl record (no 'session' string)")
        out.append(r)
    return out


def _sessions(path: str, text: str, want: str | None) -> list[dict]:
    """One run per session of a runs.jsonl file (a later record of the same benchmark replaces an
    earlier one), with the columns derived across its benchmarks, as the JSON hook does."""
    by: dict[str, dict[str, dict]] = {}
    for r in _records(path, text):
        by.setdefault(r["session"], {})[str(r.get("fullname"))] = {
            "name": r.get("name"), "fullname": r.get("fullname"), "extra_info": r.get("extra_info", {})}
    if not by:
        raise DataError(f"{path}: no records")
    ids = list(by)
    if want is not None:
        ids = [s for s in ids if s.startswith(want)]
        if len(ids) != 1:
            why = "not found" if not ids else f"is ambiguous ({_listing(ids)})"
            raise DataError(f"{path}: session '{want}' {why}; sessions there: {_listing(list(by))}")
    runs = []
    for s in ids:
        run = check_run(f"{path}#{s}", {"benchmarks": list(by[s].values()), "llm_bench": {"session": s}})
        derive_columns(run["benchmarks"])
        runs.append(run)
    return runs


def load_run(spec: str) -> list[dict]:
    """The runs in one file: a pytest-benchmark JSON is one run; a runs.jsonl is one run per session
    (or the one `file#session` names)."""
    path, _, session = spec.rpartition("#") if "#" in spec and not os.path.isfile(spec) else (spec, "", "")
    text = _read(path)
    if path.endswith(".jsonl") or session:
        return _sessions(path, text, session or None)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON document per line: a live results file under another name
            return _sessions(path, text, None)
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
    """Append one finished benchmark to the live results file, durably, so a crash later loses nothing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str) -> list[dict]:
    """The records of a live results file: a last line cut short by a crash is skipped with a warning,
    a bad line elsewhere is a DataError."""
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
