"""The stored columns people read, listed once: header, format, a legend line, which direction is
better and which benchmarks a column means something for. The end-of-run table, `llm-bench compare`
and `llm-bench report` all show these, with the legend of the columns they show."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str            # extra_info key
    header: str
    fmt: str
    legend: str
    better: str | None  # "lower", "higher", or None (no direction: a share, a count)
    only: tuple[str, ...] = ()  # the benchmark functions whose rows this number means something for; () = all

    def applies(self, name: str) -> bool:
        return not self.only or name.split("[")[0] in self.only

    def show(self, e: dict, name: str) -> str:
        """The cell for benchmark `name` with extra_info `e`: a dash where the row has no such number or
        where it means nothing (the bus bandwidth of an 8 KiB latency all-reduce)."""
        v = e.get(self.key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and self.applies(name)
        return self.fmt.format(v) if ok else "-"

    def describe(self) -> str:
        """The legend line: what the number is and which way is better."""
        return self.legend + (f"; {self.better} is better" if self.better else "")


COLUMNS = (
    Column("ttft_ms_p50", "TTFT ms", "{:.2f}", "time to first token, submit to first token on the host (p50)", "lower"),
    Column("itl_ms_p50", "ITL ms", "{:.3f}", "inter-token latency, every gap between tokens pooled (p50)", "lower"),
    Column("itl_ms_p99", "ITL p99", "{:.3f}", "inter-token latency, p99", "lower"),
    Column("tpot_ms_p50", "TPOT ms", "{:.3f}", "time per output token after the first, (E2E - TTFT)/(n - 1) (p50)",
           "lower"),
    Column("tok_per_s", "tok/s", "{:.1f}", "output tokens per second, whole batch", "higher"),
    Column("mbu", "MBU", "{:.2f}", "bytes a decode step must read / TPOT / the card's measured copy bandwidth",
           "higher"),
    Column("scaling_efficiency", "eff", "{:.2f}", "scaling efficiency: speedup x base TP / TP (1.00 = ideal)",
           "higher"),
    Column("comm_share", "comm", "{:.0%}", "share of TPOT that is exposed communication (--llm-profile-communication)",
           None),
    Column("overlap_gain", "gain", "{:+.1%}", "TPOT(none) / TPOT(mode) - 1 at the same TP and batch", "higher"),
    Column("comm_hidden_share", "hidden", "{:.0%}", "share of none's exposed communication the mode hides", "higher"),
    Column("prefill_overlap_gain", "TTFT gain", "{:+.1%}", "TTFT(none) / TTFT(mode) - 1", "higher"),
    Column("prefill_comm_hidden_share", "TTFT hidden", "{:.0%}", "share of none's exposed prefill communication "
           "the mode hides", "higher"),
    Column("allreduce_us_p50", "AR us", "{:.1f}", "all-reduce latency per op at the decode message size "
           "(batch x hidden), device time", "lower", only=("test_allreduce_latency",)),
    Column("busbw_gbps", "busbw GB/s", "{:.1f}", "all-reduce bus bandwidth at 256 MiB (NCCL-tests convention; "
           "16 MiB on CPU)", "higher", only=("test_allreduce_busbw",)),
    Column("step_gap_us_p50", "gap us", "{:.1f}", "GPU idle time between decode steps: the host's turn-around",
           "lower"),
)
BY_KEY = {c.key: c for c in COLUMNS}


def align(table: list[list[str]], text_columns: int) -> list[str]:
    """Rows of cells as lines: the first `text_columns` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(v.ljust(widths[i]) if i < text_columns else v.rjust(widths[i]) for i, v in enumerate(row))
            for row in table]


def shown_columns(rows: list[dict]) -> list[Column]:
    """The columns some row (name, extra_info) has a meaningful number for, in table order."""
    return [c for c in COLUMNS if any(c.key in (r.get("extra_info") or {}) and c.applies(r["name"]) for r in rows)]


def legend(cols: list[Column]) -> list[str]:
    """One line per column: its header and what it means; then what a dash means."""
    width = max((len(c.header) for c in cols), default=0)
    return [f"  {c.header.ljust(width)}  {c.describe()}" for c in cols] + \
        ["  (-: not measured in that run, or no meaning for that row)"]


def format_table(rows: list[dict]) -> list[str]:
    """The end-of-run table: one line per benchmark, only the columns some row has, and their legend."""
    cols = shown_columns(rows)
    head = ["benchmark"] + [c.header for c in cols]
    body = [[r["name"]] + [c.show(r.get("extra_info") or {}, r["name"]) for c in cols] for r in rows]
    lines = align([head] + body, text_columns=1)
    return [lines[0], "-" * len(lines[0])] + lines[1:] + ["legend:"] + legend(cols)
