"""Stored results: pytest-benchmark runs, picked the way pytest-benchmark picks them (a file path, an id
like `0001` in any machine folder under the storage, or the latest run when nothing is named), and
the live results file every finished benchmark is appended to as it finishes."""
from __future__ import annotations

import glob
import json
import os


class DataError(Exception):
    """A missing, unreadable or corrupt input file, naming it, or a malformed argument: `llm-bench`
    prints it and exits 2 (cli.main)."""


def find_runs(specs: list[str], storage: str = ".benchmarks") -> list[str]:
    if not specs:
        files = sorted(glob.glob(os.path.join(storage, "*", "[0-9][0-9][0-9][0-9]_*.json")),
                       key=lambda p: (os.path.basename(p), p))
        if not files:
            raise DataError(f"no stored runs under {storage}/ (run pytest with --benchmark-autosave)")
        return [files[-1]]
    out = []
    for spec in specs:
        if os.path.isfile(spec):
            out.append(spec)
            continue
        hits = sorted(glob.glob(os.path.join(storage, "*", f"{spec}*.json")) +
                      glob.glob(os.path.join(storage, "**", spec), recursive=True))
        if not hits:
            raise DataError(f"run '{spec}' not found (not a file, nor an id under {storage}/)")
        out.append(hits[-1])
    return out


def load_run(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("benchmarks"), list):
        raise DataError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list)")
    for b in d["benchmarks"]:
        if not isinstance(b, dict) or "fullname" not in b or not isinstance(b.get("extra_info", {}), dict):
            raise DataError(f"{path}: a benchmark entry is malformed")
    d["_path"] = path
    return d


def fingerprint(run: dict) -> str | None:
    return ((run.get("machine_info") or {}).get("gpu") or {}).get("fingerprint")


def load_runs(specs: list[str], storage: str = ".benchmarks") -> list[dict]:
    """The runs `specs` name (latest when empty), loaded and checked."""
    return [load_run(p) for p in find_runs(specs, storage)]


def append_record(path: str, record: dict) -> None:
    """Append one finished benchmark to the live results file, durably, so a crash later loses nothing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str) -> list[dict]:
    """The records of a live results file; a line cut short by a crash is skipped, the others stand."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out
