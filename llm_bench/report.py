"""`llm-bench report RUN... --out DIR`: PNG plots and an index.md that shows them with the numbers:
speedup vs TP with the ideal line, scaling efficiency, TTFT/ITL distributions, overlap gain per mode
and batch, and one request's per-token latency per TP size. Runs are told apart by short labels (the
parts of their paths they do not share) and one colour each, the same in every plot."""
from __future__ import annotations

import os
import shlex
from collections import defaultdict

from .columns import shown_columns
from .metrics import derive_columns, func_name
from .options import OVERLAP_MODES
from .storage import DataError, load_runs, run_labels

DPI = 100


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="PNG plots and an index.md from stored runs")
    p.add_argument("runs", nargs="*", help="run ids (0001) or files; default: the latest run")
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--out", default="results/report")
    p.set_defaults(func=run)


def _rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r, label in zip(runs, run_labels(runs)):
        rs = [{"name": b["name"], "fullname": b["fullname"], "extra_info": dict(b["extra_info"]), "run": label}
              for b in r["benchmarks"]]
        derive_columns(rs)  # stored runs from older versions may lack the cross-benchmark columns
        rows += rs
    return rows


def _bench(r: dict, all_rows: list[dict]) -> str:
    """A benchmark's short name: its parameters, with the test's name where several tests are shown."""
    func, _, params = r["name"].partition("[")
    params = params.rstrip("]").replace("-", " ")
    several = len({func_name(x) for x in all_rows}) > 1
    return (f"{func.removeprefix('test_')} {params}" if several else params) or func.removeprefix("test_")


class Style:
    """One colour per run, the same in every plot; legends outside the axes so they cover no data."""

    def __init__(self, plt, rows):
        self.runs = list(dict.fromkeys(r["run"] for r in rows))
        cmap = plt.get_cmap("tab10")
        self.colour = {run: cmap(i % 10) for i, run in enumerate(self.runs)}

    def legend(self, ax, handles=None, title=None):
        ax.legend(handles=handles, fontsize=8, title=title, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0)

    def run_handles(self, plt):
        from matplotlib.patches import Patch

        return [Patch(color=self.colour[r], label=r) for r in self.runs]


def _save(plt, fig, path) -> bool:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_speedup(plt, rows, path, st) -> bool:
    groups = defaultdict(list)
    for r in rows:
        e = r["extra_info"]
        if "speedup" in e and func_name(r) == "test_tensor_parallel":
            groups[(r["run"], e.get("batch_size"), e.get("model"))].append(e)
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    batches = sorted({b for _, b, _ in groups if b is not None})
    markers = dict(zip(batches, "osD^v<>p*h"))
    lines = ["-", "--", ":", "-."]
    top = 1.0
    for (run, bs, _model), es in sorted(groups.items(), key=lambda kv: (st.runs.index(kv[0][0]), kv[0][1] or 0)):
        es.sort(key=lambda e: e["tp"])
        ax.plot([e["tp"] for e in es], [e["speedup"] for e in es], marker=markers.get(bs, "o"), color=st.colour[run],
                ls=lines[batches.index(bs) % 4] if bs in batches else "-", label=f"{run} bs{bs}")
        top = max(top, max(e["tp"] for e in es) / es[0]["scaling_base_tp"])
    tps = sorted({e["tp"] for es in groups.values() for e in es})
    base = min(e["scaling_base_tp"] for es in groups.values() for e in es)
    ax.plot(tps, [t / base for t in tps], color="0.4", ls=(0, (4, 3)), lw=1, label="ideal (speedup = TP)")
    ax.set(xlabel="TP size", ylabel=f"speedup (TPOT at TP={base} / TPOT)", title="Tensor-parallel decode speedup")
    ax.set_xticks(tps, [str(t) for t in tps])
    ax.set_ylim(0, top * 1.08)
    ax.grid(alpha=0.3)
    st.legend(ax)
    return _save(plt, fig, path)


def plot_efficiency(plt, rows, path, st) -> bool:
    es = [r for r in rows if "scaling_efficiency" in r["extra_info"]
          and r["extra_info"]["tp"] != r["extra_info"].get("scaling_base_tp")]
    if not es:
        return False
    cfgs = sorted({(r["extra_info"]["tp"], r["extra_info"].get("batch_size") or 0) for r in es})
    runs = [run for run in st.runs if any(r["run"] == run for r in es)]
    cfg = lambda r: (r["extra_info"]["tp"], r["extra_info"].get("batch_size") or 0)  # noqa: E731
    at = {c: [run for run in runs if any(r["run"] == run and cfg(r) == c for r in es)] for c in cfgs}
    w = 0.8 / max(len(v) for v in at.values())
    fig, ax = plt.subplots(figsize=(max(5.5, 1.0 * len(cfgs) * max(1, len(runs) / 2) + 2), 4))
    for run in runs:  # the runs that have a configuration, centred on its tick
        by = {cfg(r): r["extra_info"]["scaling_efficiency"] for r in es if r["run"] == run}
        xs = [j + (at[c].index(run) - (len(at[c]) - 1) / 2) * w for j, c in enumerate(cfgs) if c in by]
        bars = ax.bar(xs, [by[c] for c in cfgs if c in by], w * 0.95, color=st.colour[run], label=run)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axhline(1.0, color="0.4", ls=(0, (4, 3)), lw=1)
    ax.set_xticks(range(len(cfgs)), [f"TP={t} bs{b}" for t, b in cfgs], fontsize=8)
    base = min(r["extra_info"].get("scaling_base_tp", 1) for r in es)
    ax.set(ylabel="scaling efficiency", ylim=(0, 1.15),
           title=f"Scaling efficiency vs TP={base} (1.0 = ideal, dashed)")
    st.legend(ax)
    return _save(plt, fig, path)


def plot_latency(plt, rows, path, st) -> bool:
    es = [r for r in rows if "ttft_ms_p50" in r["extra_info"]]
    if not es:
        return False
    names = list(dict.fromkeys(_bench(r, es) for r in es))
    runs = [run for run in st.runs if any(r["run"] == run for r in es)]
    w = 0.8 / max(len({r["run"] for r in es if _bench(r, es) == n}) for n in names)
    fig, axes = plt.subplots(2, 1, figsize=(min(14, max(7, 0.9 * len(names) + 2.5)), 7), sharex=True)
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "itl_ms", "inter-token latency (ms)")):
        for j, n in enumerate(names):
            here = [r for r in es if _bench(r, es) == n and f"{key}_p50" in r["extra_info"]]
            here.sort(key=lambda r: runs.index(r["run"]))
            for i, r in enumerate(here):  # the runs that have this benchmark, centred on its tick
                e, c = r["extra_info"], st.colour[r["run"]]
                med = e[f"{key}_p50"]
                ax.bxp([{"med": med, "q1": e.get(f"{key}_p25", med), "q3": e.get(f"{key}_p75", med),
                         "whislo": e.get(f"{key}_min", med), "whishi": e.get(f"{key}_p99", med)}],
                       positions=[j + (i - (len(here) - 1) / 2) * w], widths=w * 0.8, showfliers=False,
                       patch_artist=True, manage_ticks=False, boxprops={"facecolor": c, "edgecolor": c},
                       medianprops={"color": "k", "lw": 1.5}, whiskerprops={"color": c}, capprops={"color": c})
        lows = [r["extra_info"][f"{key}_p50"] for r in es if f"{key}_p50" in r["extra_info"]]
        if lows and min(lows) > 0 and max(lows) / min(lows) > 20:  # e.g. 128- and 8192-token prompts together
            ax.set_yscale("log")
            title += ", log scale"
        else:
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set(ylabel=title)
        if len(runs) > 1:
            st.legend(ax, st.run_handles(plt), title="run")
    axes[0].set_title("TTFT and inter-token latency: box p25-p75, black line p50, whiskers min to p99", fontsize=10)
    tilt = len(names) > 4
    axes[1].set_xticks(range(len(names)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=8)
    return _save(plt, fig, path)


def _gain_bars(ax, es: list[dict], key: str, st, cmap, legend: bool = True) -> None:
    """Bars of `key` (a gain vs none, in %) per mode, grouped by (run, TP, batch); no bar: not run."""
    order = {m: i for i, m in enumerate(OVERLAP_MODES)}
    modes = sorted({r["extra_info"]["overlap"] for r in es}, key=lambda m: order.get(m, len(order)))
    several = len({r["run"] for r in es}) > 1
    cfgs = sorted({(st.runs.index(r["run"]), r["extra_info"]["tp"], r["extra_info"].get("batch_size") or 0)
                   for r in es})
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        by = {(st.runs.index(r["run"]), r["extra_info"]["tp"], r["extra_info"].get("batch_size") or 0):
              r["extra_info"][key] * 100 for r in es if r["extra_info"]["overlap"] == m}
        xs = [j + (i - (len(modes) - 1) / 2) * w for j, c in enumerate(cfgs) if c in by]
        bars = ax.bar(xs, [by[c] for c in cfgs if c in by], w * 0.95, label=m, color=cmap(order.get(m, i) % 10))
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=1)
    ax.axhline(0, color="k", lw=1)
    labels = [(st.runs[k].replace("-", "-\n", 1) + "\n" if several else "") + f"TP={t} bs{b}" for k, t, b in cfgs]
    ax.set_xticks(range(len(cfgs)), labels, fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if legend:
        st.legend(ax, title="mode")


def plot_overlap(plt, rows, path, st) -> bool:
    """Decode gain (TPOT) per mode, and beside it the prefill gain (TTFT) where a mode split the
    prefill (`pipeline-prefill` in overlap_applied): the only part of a mode that acts on TTFT."""
    es = [r for r in rows if "overlap_gain" in r["extra_info"] and r["extra_info"].get("overlap") != "none"
          and set(str(r["extra_info"].get("overlap_applied", "")).split(",")) - {"pipeline-prefill", "none", ""}]
    if not es:  # `none` is the reference (gain 0); a mode that split only the prefill changed no decode step
        return False
    pre = [r for r in rows if "prefill_overlap_gain" in r["extra_info"]
           and "pipeline-prefill" in str(r["extra_info"].get("overlap_applied", ""))]
    cfgs = {(r["run"], r["extra_info"]["tp"], r["extra_info"].get("batch_size")) for r in es}
    fig, axes = plt.subplots(1, 2 if pre else 1, figsize=(max(6, 1.3 * len(cfgs) + 2) + (4 if pre else 0), 4.2),
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, len(cfgs)), 1]} if pre else None)
    cmap = plt.get_cmap("tab10")
    _gain_bars(axes[0][0], es, "overlap_gain", st, cmap, legend=not pre)
    axes[0][0].set(ylabel="gain vs none (%)", title="Decode: TPOT(none) / TPOT(mode) - 1 (no bar: not run)")
    if pre:  # one legend for both panels, right of the second
        _gain_bars(axes[0][1], pre, "prefill_overlap_gain", st, cmap, legend=False)
        axes[0][1].set(title="Prefill chunks: TTFT gain", ylabel="gain vs none (%)")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
        st.legend(axes[0][1], handles=list(handles.values()), title="mode")
    return _save(plt, fig, path)


def _timeline_rows(rows: list[dict]) -> dict[int, list[dict]]:
    """Per TP size, one request per run: the smallest batch of the tensor-parallel test (overlap none),
    else of the baseline or the overlap test's `none`."""
    rank = {"test_tensor_parallel": 0, "test_baseline": 1, "test_overlap": 2}
    pick: dict[tuple, dict] = {}
    for r in rows:
        e = r["extra_info"]
        if not e.get("token_ms_timeline") or func_name(r) not in rank or e.get("overlap", "none") != "none":
            continue
        k = (e.get("tp", 1), r["run"])
        score = (rank[func_name(r)], e.get("batch_size") or 0)
        if k not in pick or score < pick[k][0]:
            pick[k] = (score, r)
    out: dict[int, list[dict]] = defaultdict(list)
    for (tp, _), (_, r) in sorted(pick.items(), key=lambda kv: kv[0][0]):  # runs in the order given
        out[tp].append(r)
    return dict(sorted(out.items()))


def plot_timeline(plt, rows, path, st) -> bool:
    by_tp = _timeline_rows(rows)
    if not by_tp:
        return False
    fig, axes = plt.subplots(len(by_tp), 1, figsize=(7.5, 1.9 * len(by_tp) + 0.8), sharex=True, squeeze=False)
    top = max(max(r["extra_info"]["token_ms_timeline"][1:] or [0]) for rs in by_tp.values() for r in rs)
    for ax, (tp, rs) in zip(axes[:, 0], by_tp.items()):
        for r in rs:
            t = r["extra_info"]["token_ms_timeline"]
            ax.plot(range(1, len(t)), t[1:], color=st.colour[r["run"]], lw=1,
                    label=f"{r['run']}: {_bench(r, rows)}, TTFT {t[0]:.2f} ms")
        ax.set_ylim(0, top * 1.1)
        ax.set_title(f"TP={tp}", fontsize=9, loc="left")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        st.legend(ax)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes[-1, 0].set_xlabel("output token (gap before it; token 0's TTFT is in the legend)")
    fig.suptitle("Per-token latency of one request per TP size (inter-token gaps)", fontsize=10)
    return _save(plt, fig, path)


PLOTS = [("speedup.png", plot_speedup, "Speedup vs TP size, with the ideal line"),
         ("efficiency.png", plot_efficiency, "Scaling efficiency"),
         ("latency.png", plot_latency, "TTFT and inter-token latency distributions"),
         ("overlap_gain.png", plot_overlap, "Overlap gain per mode, TP and batch"),
         ("timeline.png", plot_timeline, "Per-token latency of one request per TP size")]


def _gpu_line(run: dict) -> str | None:
    gpu = (run.get("machine_info") or {}).get("gpu") or {}
    if not gpu.get("gpu_names"):
        return None
    return (f"{gpu.get('gpu_count')}x {', '.join(map(str, gpu['gpu_names']))}, driver {gpu.get('driver')}, "
            f"torch {gpu.get('torch')}, NCCL {gpu.get('nccl')}")


# Engine options stored with each benchmark that change what a number means (one cell per run).
OPTION_COLUMNS = ("allreduce", "compiled", "gemv", "decode_attention", "pdl", "pipeline_min_batch",
                  "pipeline_min_tokens", "prefetch_mb", "prompt_len", "output_len", "rounds")


def _options_line(run: dict) -> str:
    """The engine options of `run`'s benchmarks, each with every value it took there."""
    seen: dict[str, list] = {}
    for b in run.get("benchmarks", []):
        for k in OPTION_COLUMNS:
            v = (b.get("extra_info") or {}).get(k)
            if v is not None and v not in seen.setdefault(k, []):
                seen[k].append(v)
    return ", ".join(f"{k} {'/'.join(map(str, vs))}" for k, vs in seen.items() if vs)


def make_report(runs: list[dict], out: str, command: str | None = None) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise DataError("matplotlib is not installed (pip install matplotlib, or the package's [dev] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(runs)
    cols = shown_columns(rows)
    if not cols:
        raise DataError(f"no benchmark in {', '.join(r['_path'] for r in runs)} holds a measurement (interrupted "
                        "runs keep an empty extra_info): nothing to report")
    st = Style(plt, rows)
    try:
        os.makedirs(out, exist_ok=True)
        made = [(f, cap) for f, fn, cap in PLOTS if fn(plt, rows, os.path.join(out, f), st)]
        lines = ["# parallel-llm-bench report", ""]
        if command:
            lines += [f"Made with `{command}`.", ""]
        lines += ["| run | file | GPUs | engine options |", "|---|---|---|---|"]
        lines += [f"| {lab} | `{r['_path']}` | {_gpu_line(r) or '-'} | {_options_line(r) or '-'} |"
                  for lab, r in zip(run_labels(runs), runs)]
        lines.append("")
        for f, cap in made:
            lines += [f"## {cap}", "", f"![{cap}]({f})", ""]
        lines += ["## Numbers", "", "| run | benchmark | " + " | ".join(c.header for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for r in rows:
            lines.append(f"| {r['run']} | {r['name']} | "
                         + " | ".join(c.show(r["extra_info"], r["name"]) for c in cols) + " |")
        lines += ["", "Columns:", ""] + [f"- **{c.header}**: {c.describe()}" for c in cols]
        lines += ["", "A dash: not measured in that run, or no meaning for that row."]
        with open(os.path.join(out, "index.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    except OSError as e:
        raise DataError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return [f for f, _ in made]


def run(a) -> int:
    runs = load_runs(a.runs, a.storage)
    command = shlex.join(["llm-bench", "report", *a.runs, "--out", a.out]
                         + (["--storage", a.storage] if a.storage != ".benchmarks" else []))
    made = make_report(runs, a.out, command)
    print(f"wrote {len(made)} plots and index.md to {a.out}: {', '.join(made)}")
    return 0
