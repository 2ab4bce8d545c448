"""`llm-bench compare`: runs side by side with our columns (TTFT/ITL/TPOT, tok/s, MBU, efficiency,
comm share, overlap gain) and the % change against the first run."""
from __future__ import annotations

import csv
import json

from .columns import COLUMNS, align
from .storage import fingerprint, load_runs

DEFAULT_COLUMNS = [c.key for c in COLUMNS]


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="stored runs side by side with TTFT/ITL/efficiency columns")
    p.add_argument("runs", nargs="*", help="run ids (0001), files; default: the latest run")
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS))
    p.add_argument("--group-by", default=None, help="extra_info keys, e.g. tp,overlap,batch_size")
    p.add_argument("--csv", default=None, metavar="FILE")
    p.add_argument("--json", default=None, metavar="FILE")
    p.set_defaults(func=run)


def rows_for(runs: list[dict], columns: list[str], group_by: list[str]) -> list[dict]:
    base = {b["fullname"]: b.get("extra_info") or {} for b in runs[0]["benchmarks"]}
    rows = []
    for i, run in enumerate(runs):
        for b in run["benchmarks"]:
            e = b.get("extra_info") or {}
            row = {"run": run["_path"], "benchmark": b["name"], **{g: e.get(g) for g in group_by}}
            for c in columns:
                v = e.get(c)
                row[c] = v
                ref = base.get(b["fullname"], {}).get(c)
                if i > 0 and isinstance(v, (int, float)) and isinstance(ref, (int, float)) and ref:
                    row[c + "_change"] = (v - ref) / abs(ref)
            rows.append(row)
    key = lambda r: tuple(str(r.get(g)) for g in group_by) + (r["benchmark"], r["run"])  # noqa: E731
    return sorted(rows, key=key)


def run(a) -> int:
    runs = load_runs(a.runs, a.storage)
    columns = [c for c in a.columns.split(",") if c]
    group_by = [g for g in (a.group_by or "").split(",") if g]
    rows = rows_for(runs, columns, group_by)
    fps = {fingerprint(r) for r in runs}
    if len(fps) > 1:
        print(f"warning: runs come from different GPU fingerprints {sorted(map(str, fps))}: "
              f"differences may be the machine, not the code")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("run", "benchmark"), k))
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    shown = [c for c in columns if any(r.get(c) is not None for r in rows)]
    head = ["run", "benchmark"] + group_by + shown
    table = [head]
    for r in rows:
        cells = [r["run"].split("/")[-1][:28], r["benchmark"]] + [str(r.get(g)) for g in group_by]
        for c in shown:
            v = r.get(c)
            cell = "-" if v is None else f"{v:.4g}"
            if c + "_change" in r:
                cell += f" ({r[c + '_change']:+.1%})"
            cells.append(cell)
        table.append(cells)
    print("\n".join(align(table, text_columns=len(head))))  # numbers carry their % change: left-aligned
    return 0
