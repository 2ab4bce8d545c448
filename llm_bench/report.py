"""`llm-bench report RUN... --out DIR`: PNG plots and an index.md that shows them with the numbers:
speedup vs TP with the ideal line, scaling efficiency, TTFT/ITL distributions, overlap gain per mode
and batch, and one request's per-token latency timeline."""
from __future__ import annotations

import os
from collections import defaultdict

from .columns import COLUMNS
from .metrics import derive_columns
from .options import OVERLAP_MODES
from .storage import load_runs



def add_parser(sub) -> None:
    p = sub.add_parser("report", help="PNG plots and an index.md from stored runs")
    p.add_argument("runs", nargs="*", help="run ids (0001) or files; default: the latest run")
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--out", default="results/report")
    p.set_defaults(func=run)


def _rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        rs = [{"name": b["name"], "fullname": b["fullname"], "extra_info": dict(b.get("extra_info") or {}),
               "run": os.path.basename(r["_path"])} for b in r["benchmarks"]]
        derive_columns(rs)  # stored runs from older versions may lack the cross-benchmark columns
        rows += rs
    return rows


def _label(e: dict) -> str:
    return f"{e.get('model')} bs{e.get('batch_size')}"


def _save(plt, fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedup(plt, rows, path) -> bool:
    groups = defaultdict(list)
    for r in rows:
        e = r["extra_info"]
        if "speedup" in e and r["name"].startswith("test_tensor_parallel"):
            groups[(r["run"], _label(e))].append(e)
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = 1
    for (run, label), es in sorted(groups.items()):
        es.sort(key=lambda e: e["tp"])
        tps = [e["tp"] for e in es]
        ax.plot(tps, [e["speedup"] for e in es], "o-", label=f"{label}" + (f" ({run})" if len(groups) > 1 else ""))
        for e in es:
            ax.annotate(f"{e['scaling_efficiency']:.2f}", (e["tp"], e["speedup"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        base = es[0]["scaling_base_tp"]
        top = max(top, max(tps) / base)
    ideal = [1, 2, 4, 8, 16, 32]
    ax.plot([t for t in ideal if t <= top], [t for t in ideal if t <= top], "k--", lw=1, label="ideal")
    ax.set(xlabel="TP size (relative to the smallest measured)", ylabel="speedup (TPOT base / TPOT)",
           title="Tensor-parallel speedup (labels: scaling efficiency)")
    ax.set_xticks(sorted({e["tp"] for es in groups.values() for e in es} | {1}))
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_efficiency(plt, rows, path) -> bool:
    es = [(r["name"], r["extra_info"]) for r in rows if "scaling_efficiency" in r["extra_info"]]
    if not es:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(es)), 4))
    ax.bar(range(len(es)), [e["scaling_efficiency"] for _, e in es], color="tab:blue")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(es)), [f"tp{e['tp']} bs{e.get('batch_size')}" for _, e in es], rotation=30, fontsize=8)
    ax.set(ylabel="scaling efficiency", title="Scaling efficiency (1.0 = ideal)", ylim=(0, 1.15))
    return _save(plt, fig, path)


def plot_latency(plt, rows, path) -> bool:
    es = [(r["name"], r["extra_info"]) for r in rows if "ttft_ms_p50" in r["extra_info"]]
    if not es:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(es)), 4.5))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT ms"), (axes[1], "itl_ms", "ITL ms")):
        stats = []
        for name, e in es:
            if f"{key}_p50" not in e:
                continue
            stats.append({"label": name.replace("test_", ""), "med": e[f"{key}_p50"],
                          "q1": e.get(f"{key}_p25", e[f"{key}_p50"]), "q3": e.get(f"{key}_p75", e[f"{key}_p50"]),
                          "whislo": e.get(f"{key}_min", e[f"{key}_p50"]), "whishi": e.get(f"{key}_p99", e[f"{key}_p50"]),
                          "mean": e.get(f"{key}_mean")})
        if stats:
            ax.bxp(stats, showfliers=False, showmeans=True)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.set(title=f"{title} (box p25-p75, whiskers min-p99)")
    return _save(plt, fig, path)


def plot_overlap(plt, rows, path) -> bool:
    es = [r["extra_info"] for r in rows if "overlap_gain" in r["extra_info"]]
    if not es:
        return False
    modes = sorted({e["overlap"] for e in es}, key=lambda m: OVERLAP_MODES.index(m) if m in OVERLAP_MODES else len(OVERLAP_MODES))
    cfgs = sorted({(e["tp"], e["batch_size"]) for e in es})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cfgs)), 4))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        by = {(e["tp"], e["batch_size"]): e["overlap_gain"] * 100 for e in es if e["overlap"] == m}
        ax.bar([j + i * w for j in range(len(cfgs))], [by.get(c, 0) for c in cfgs], w, label=m)
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cfgs))], [f"tp{t} bs{b}" for t, b in cfgs])
    ax.set(ylabel="gain vs none (%)", title="Overlap gain (TPOT none / TPOT mode - 1)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_timeline(plt, rows, path) -> bool:
    pick = next((r for r in rows if r["extra_info"].get("token_ms_timeline")), None)
    if pick is None:
        return False
    t = pick["extra_info"]["token_ms_timeline"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(t)), t, ".-")
    ax.set_yscale("log")
    ax.set(xlabel="output token", ylabel="latency (ms, log)", title=f"Per-token latency, one request: {pick['name']}")
    return _save(plt, fig, path)


PLOTS = [("speedup.png", plot_speedup, "Speedup vs TP size, with the ideal line"),
         ("efficiency.png", plot_efficiency, "Scaling efficiency"),
         ("latency.png", plot_latency, "TTFT and inter-token latency distributions"),
         ("overlap_gain.png", plot_overlap, "Overlap gain per mode, TP and batch"),
         ("timeline.png", plot_timeline, "Per-token latency of one request")]


def make_report(runs: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    rows = _rows(runs)
    made = [(f, cap) for f, fn, cap in PLOTS if fn(plt, rows, os.path.join(out, f))]
    lines = ["# parallel-llm-bench report", "", "Runs: " + ", ".join(f"`{r['_path']}`" for r in runs), ""]
    gpu = (runs[0].get("machine_info") or {}).get("gpu") or {}
    if gpu.get("gpu_names"):
        lines += [f"GPUs: {gpu.get('gpu_count')}x {', '.join(gpu['gpu_names'])}, driver {gpu.get('driver')}, "
                  f"torch {gpu.get('torch')}, NCCL {gpu.get('nccl')}", ""]
    for f, cap in made:
        lines += [f"## {cap}", "", f"![{cap}]({f})", ""]
    cols = [c for c in COLUMNS if any(c.key in r["extra_info"] for r in rows)]
    lines += ["## Numbers", "", "| run | benchmark | " + " | ".join(c.header for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['run']} | {r['name']} | " + " | ".join(c.show(r["extra_info"]) for c in cols) + " |")
    with open(os.path.join(out, "index.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return [f for f, _ in made]


def run(a) -> int:
    made = make_report(load_runs(a.runs, a.storage), a.out)
    print(f"wrote {len(made)} plots and index.md to {a.out}: {', '.join(made)}")
    return 0
