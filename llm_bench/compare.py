"""`llm-bench compare`: runs side by side with our columns (TTFT/ITL/TPOT, tok/s, MBU, efficiency,
comm share, overlap gain) and, for each later run, the % change against the first with a word on
it: `better` or `worse` (each column knows its direction) when the two runs' per-round values do not
overlap, `noise` when they do, and a `?` after the word where the column has no per-round samples
and the spread is unknown."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys

from .columns import BY_KEY, COLUMNS, align, legend
from .storage import DataError, fingerprint, is_number, json_safe, load_runs, run_labels, write_output

DEFAULT_COLUMNS = [c.key for c in COLUMNS]
# Per-round samples of a column: the spread a change is judged against.
ROUNDS = {"tpot_ms_p50": "tpot_ms_rounds", "ttft_ms_p50": "ttft_ms_rounds", "tok_per_s": "tok_per_s_rounds",
          "allreduce_us_p50": "allreduce_us_rounds"}


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="stored runs side by side with TTFT/ITL/efficiency columns")
    p.add_argument("runs", nargs="*", help="run ids (0001), files (pytest-benchmark JSON, results/runs.jsonl, "
                                           "runs.jsonl#SESSION); default: the latest run")
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--columns", default=None,
                   help="extra_info keys, comma-separated (default: every column of the end-of-run table)")
    p.add_argument("--group-by", default=None, help="extra_info keys, e.g. tp,overlap,batch_size")
    p.add_argument("--csv", default=None, metavar="FILE", help="- for stdout (instead of the table)")
    p.add_argument("--json", default=None, metavar="FILE", help="- for stdout (instead of the table)")
    p.set_defaults(func=run)


def judge(column: str, ref: dict, e: dict, change: float) -> str | None:
    """better / worse / noise for one column's change from extra_info `ref` to `e` (None: the column
    has no direction); `?` appended where there are no per-round samples to tell noise from change."""
    col = BY_KEY.get(column)
    if col is None or col.better is None or change == 0:
        return None
    word = "better" if (change < 0) == (col.better == "lower") else "worse"
    a, b = ref.get(ROUNDS.get(column, "")), e.get(ROUNDS.get(column, ""))
    if not a or not b:
        return word + "?"
    return "noise" if min(b) <= max(a) and min(a) <= max(b) else word


# Columns relative to the smallest TP measured beside them: comparable only against the same base TP.
SCALING = ("speedup", "throughput_ratio", "scaling_efficiency")


def rows_for(runs: list[dict], labels: list[str], columns: list[str], group_by: list[str]) -> list[dict]:
    base = {b["fullname"]: b["extra_info"] for b in runs[0]["benchmarks"]}
    rows = []
    for i, run in enumerate(runs):
        for b in run["benchmarks"]:
            e = b["extra_info"]
            row = {"run": labels[i], "path": run["_path"], "benchmark": b["name"], **{g: e.get(g) for g in group_by}}
            ref = base.get(b["fullname"], {})
            for c in columns:
                v = e.get(c)
                row[c] = v
                r = ref.get(c)
                if i > 0 and c in SCALING and e.get("scaling_base_tp") != ref.get("scaling_base_tp"):
                    row[c + "_note"] = f"base TP {ref.get('scaling_base_tp')} vs {e.get('scaling_base_tp')}"
                elif i > 0 and is_number(v) and is_number(r) and r and math.isfinite(v) and math.isfinite(r):
                    row[c + "_change"] = (v - r) / abs(r)
                    row[c + "_verdict"] = judge(c, ref, e, row[c + "_change"])
            rows.append(row)
    return sorted(rows, key=lambda r: tuple(natural(str(r.get(g))) for g in group_by)
                  + (natural(r["benchmark"]), labels.index(r["run"])))


def natural(name: str) -> tuple:
    """Sort key that puts bs1 before bs16 before bs64."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _cell(column: str, row: dict) -> str:
    v = row.get(column)
    col = BY_KEY.get(column)
    if v is None:
        return "-"
    if col is not None:
        cell = col.show({column: v}, row["benchmark"])
        if cell == "-":  # no meaning for this row
            return cell
    else:
        cell = f"{v:.4g}" if is_number(v) else str(v)
    if column + "_note" in row:  # a change that means nothing: said instead of computed
        cell += f" (not comparable: {row[column + '_note']})"
    elif column + "_change" in row:
        word = row.get(column + "_verdict")
        cell += f" ({row[column + '_change']:+.1%}" + (f" {word})" if word else ")")
    return cell


def _csv(rows: list[dict]) -> str:
    first = ["run", "path", "benchmark"]
    keys = first + sorted({k for r in rows for k in r} - set(first))
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def run(a) -> int:
    if a.csv == "-" and a.json == "-":
        raise DataError("--csv - and --json - both ask for stdout: give one of them a file")
    columns = DEFAULT_COLUMNS if a.columns is None else [c.strip() for c in a.columns.split(",") if c.strip()]
    group_by = [g.strip() for g in (a.group_by or "").split(",") if g.strip()]
    if not columns:
        raise DataError(f"--columns {a.columns!r}: no column named")
    runs = load_runs(a.runs, a.storage)
    present = {k for r in runs for b in r["benchmarks"] for k in b["extra_info"]}
    unknown = [c for c in columns + group_by if c not in BY_KEY and c not in present]
    if unknown:
        raise DataError(f"unknown column {', '.join(map(repr, unknown))}: not in the column table nor in any "
                        f"benchmark's extra_info; columns: {', '.join(DEFAULT_COLUMNS)}")
    names0 = {b["fullname"] for b in runs[0]["benchmarks"]}
    for r in runs[1:]:
        if not names0 & {b["fullname"] for b in r["benchmarks"]}:
            raise DataError(f"no benchmark in common between {runs[0]['_path']} and {r['_path']}: nothing to compare "
                            f"(compare runs of the same benchmarks)")
    labels = run_labels(runs)
    rows = rows_for(runs, labels, columns, group_by)
    fps = {fingerprint(r) for r in runs}
    if len(fps) > 1:
        print(f"warning: runs come from different GPU fingerprints {sorted(map(str, fps))}: "
              f"differences may be the machine, not the code", file=sys.stderr)
    if a.json:
        write_output(a.json, json.dumps(json_safe(rows), indent=1) + "\n")
    if a.csv:
        write_output(a.csv, _csv(rows))
    if "-" in (a.json, a.csv):
        return 0
    shown = [c for c in columns if any(r.get(c) is not None for r in rows)]
    absent = [c for c in columns if c not in shown and a.columns is not None]
    if absent:
        print(f"note: no benchmark of these runs has {', '.join(absent)}", file=sys.stderr)
    head = ["run", "benchmark"] + group_by + [BY_KEY[c].header if c in BY_KEY else c for c in shown]
    table = [head] + [[r["run"], r["benchmark"]] + [str(r.get(g)) for g in group_by] + [_cell(c, r) for c in shown]
                      for r in rows]
    lines = []
    if len(runs) > 1 or labels[0] != runs[0]["_path"]:
        lines += [f"{lab}: {r['_path']}" for lab, r in zip(labels, runs)] + [""]
    lines += align(table, text_columns=len(head))  # numbers carry their % change: left-aligned
    known = [BY_KEY[c] for c in shown if c in BY_KEY]
    lines += ["legend:"] + legend(known)
    if len(runs) > 1:
        lines.append("  (+x% word): change against the first run; better/worse: the runs' per-round values do not "
                     "overlap; noise: they overlap; ?: no per-round samples, the spread is unknown")
    print("\n".join(lines))
    return 0
