"""Traces are valid Chrome trace JSON and `llm-bench trace` reads them, the report draws every plot
from a stored CPU run and from the committed GPU runs (runs told apart by short labels, one timeline
per TP size), the end-of-run table has a legend and a dash where a number means nothing, and the
profiling script's basic mode runs on CPU without NVML and says so."""
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from llm_bench.cli import main
from llm_bench.columns import format_table
from llm_bench.storage import load_runs, run_labels
from tests.helpers import ROOT, run_pytest

GPU = ROOT / ".benchmarks" / "gpu"
S5 = [str(GPU / "H200x2" / "20261126-s5-llama3-8b-tp.json"), str(GPU / "H200x4" / "20261126-s5-llama3-8b-tp.json"),
      str(GPU / "H200x4" / "20261126-s5-llama3-8b-overlap-tp4.json")]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    r = run_pytest(ROOT / "benchmarks", "-k", "test_tensor_parallel or test_overlap", "--llm-batch-sizes", "2",
                   "--llm-overlap-modes", "none", "double_buffer", "--llm-prompt-len", "4", "--llm-max-tokens", "6",
                   "--llm-num-runs", "2", "--llm-warmup-runs", "0", "--llm-enable-trace", "--llm-profile-communication",
                   "--llm-results-dir", d / "res", f"--benchmark-json={d / 'run.json'}")
    assert r.returncode == 0, r.stdout[-3000:]
    return d


def _trace_of(run_json, name: str) -> str:
    """The trace file the run's JSON points to for benchmark `name`."""
    run = json.loads(run_json.read_text())
    return next(b["extra_info"]["trace_file"] for b in run["benchmarks"] if b["name"] == name)


def test_trace_is_valid_chrome_trace(cpu_run):
    path = Path(_trace_of(cpu_run / "run.json", "test_tensor_parallel[tp2-bs2]"))
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"requests", "ranks"} <= names and any(n.startswith("comm-free") for n in names)
    tracks = defaultdict(list)
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= set(e)
        assert e["ph"] in ("X", "M", "C", "B", "E")
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] > 0
            tracks[(e["pid"], e["tid"])].append(e)
    rank_tracks = {tid for (pid, tid) in tracks if pid == 2}
    assert rank_tracks == {1, 2}  # one track per rank at TP=2
    for evs in tracks.values():
        steps = [e["ts"] for e in evs if e["name"] in ("decode", "step")]
        assert steps == sorted(steps)  # monotonic on every track
    begins = sum(e["ph"] == "B" for e in events)
    assert begins == sum(e["ph"] == "E" for e in events)


def test_a_later_session_does_not_overwrite_an_earlier_sessions_trace(cpu_run, tmp_path):
    """Each session's traces carry its id; a second session with the same results folder writes its
    own, and the first run's stored `trace_file` still holds the first session's trace."""
    first = _trace_of(cpu_run / "run.json", "test_tensor_parallel[tp2-bs2]")
    session = json.loads((cpu_run / "run.json").read_text())["llm_bench"]["session"]
    assert first.endswith(f"/traces/test_tensor_parallel_tp2-bs2-{session}.json"), first
    before = Path(first).read_bytes()
    r = run_pytest(ROOT / "benchmarks", "-k", "test_tensor_parallel and tp2", "--llm-batch-sizes", "2",
                   "--llm-prompt-len", "4", "--llm-max-tokens", "3", "--llm-num-runs", "1", "--llm-warmup-runs", "0",
                   "--llm-enable-trace", "--llm-results-dir", cpu_run / "res",
                   f"--benchmark-json={tmp_path / 'run.json'}")
    assert r.returncode == 0, r.stdout[-3000:]
    second = _trace_of(tmp_path / "run.json", "test_tensor_parallel[tp2-bs2]")
    assert second != first and Path(second).is_file() and Path(first).read_bytes() == before


def test_trace_command_reads_steps_ranks_and_comm_share(cpu_run, tmp_path, capsys):
    path = _trace_of(cpu_run / "run.json", "test_tensor_parallel[tp2-bs2]")
    assert main(["trace", path, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)[path]
    assert s["rounds"] == 2 and set(s["rank_step_ms_p50"]) == {"rank 0", "rank 1"}
    assert 0 < s["comm_free_step_ms_p50"] < s["decode_step_ms_p50"] and 0 < s["comm_share"] < 1
    assert s["rank_skew_us_max"] >= s["rank_skew_us_p50"] >= 0
    assert main(["trace", path]) == 0 and "comm share:" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "array.json").write_text('[{"name": "prefill (0)", "ph": "B", "ts": 1, "pid": 1, "tid": 0}]')
    for name, why in (("bad.json", "cannot read trace"), ("array.json", "not a parallel-llm-bench trace")):
        assert main(["trace", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and why in err
    assert main(["trace", path, str(tmp_path / "array.json")]) == 0  # another tool's trace is skipped
    err = capsys.readouterr().err
    assert "llm-bench trace: skipped " in err and "array.json: not a parallel-llm-bench trace" in err


def test_report_draws_every_plot(cpu_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(cpu_run / "run.json"), "--out", str(out)]) == 0
    for png in ("speedup.png", "efficiency.png", "latency.png", "overlap_gain.png", "timeline.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in (out / "index.md").read_text()
    assert "test_tensor_parallel[tp2-bs2]" in (out / "index.md").read_text()


def test_report_of_committed_gpu_runs_labels_runs_and_draws_each_tp(tmp_path):
    """Two files of the same name on 2 and 4 GPUs and an overlap run: short labels that tell them apart
    (not 60-character file names), every plot, one timeline per TP size with a request of each run."""
    from llm_bench.report import _rows, _timeline_rows

    runs = load_runs(S5)
    assert run_labels(runs) == ["H200x2-tp", "H200x4-tp", "H200x4-overlap-tp4"]
    by_tp = _timeline_rows(_rows(runs))
    assert {tp: [r["run"] for r in rs] for tp, rs in by_tp.items()} == {
        1: ["H200x2-tp", "H200x4-tp"], 2: ["H200x2-tp", "H200x4-tp"], 4: ["H200x4-tp", "H200x4-overlap-tp4"]}
    assert all(r["extra_info"]["batch_size"] == 1 for rs in by_tp.values() for r in rs)
    out = tmp_path / "report"
    assert main(["report", *S5, "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    for png in ("speedup.png", "efficiency.png", "latency.png", "overlap_gain.png", "timeline.png"):
        assert f"({png})" in index and (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| H200x4-tp | test_tensor_parallel[tp4-bs1] |" in index and "- **eff**: scaling efficiency" in index
    assert f"Made with `llm-bench report {S5[0]}" in index


def test_every_committed_gpu_run_still_reads(tmp_path, capsys):
    """Old files lack columns (no busbw, no rounds, no derived columns): compare and report still work."""
    files = sorted(str(p) for p in GPU.glob("*/*.json") if '"benchmarks"' in p.read_text())
    assert len(files) >= 20
    for f in files:
        assert main(["compare", f]) == 0, f
    assert main(["report", str(GPU / "H200x2" / "20261126-llama3-8b-trace-run.json"),
                 str(GPU / "H200x2" / "20261126-llama3-70b-tensor_parallel.json"), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()


def test_end_of_run_table_has_a_legend_and_dashes_where_a_number_means_nothing():
    """busbw of an 8 KiB latency all-reduce and the per-op latency of the 256 MiB bandwidth point mean
    nothing under their columns' definitions: a dash. The legend lists the columns shown, only those."""
    rows = [{"name": "test_tensor_parallel[tp2-bs1]", "extra_info": {"tpot_ms_p50": 3.0, "scaling_efficiency": 0.6}},
            {"name": "test_allreduce_latency[tp2-bs1]", "extra_info": {"allreduce_us_p50": 7.5, "busbw_gbps": 1.09}},
            {"name": "test_allreduce_busbw[tp2]", "extra_info": {"allreduce_us_p50": 896.5, "busbw_gbps": 299.4}}]
    lines = format_table(rows)
    assert lines[0].split() == ["benchmark", "TPOT", "ms", "eff", "AR", "us", "busbw", "GB/s"]
    cells = {ln.split()[0]: ln.split()[1:] for ln in lines[2:5]}
    assert cells == {"test_tensor_parallel[tp2-bs1]": ["3.000", "0.60", "-", "-"],
                     "test_allreduce_latency[tp2-bs1]": ["-", "-", "7.5", "-"],
                     "test_allreduce_busbw[tp2]": ["-", "-", "-", "299.4"]}
    legend = lines[lines.index("legend:") + 1:]
    assert [ln.split("  ")[1].strip() for ln in legend[:-1]] == ["TPOT ms", "eff", "AR us", "busbw GB/s"]
    assert "scaling efficiency" in legend[1] and "higher is better" in legend[1]
    assert legend[-1].strip().startswith("(-: not measured")


def test_profile_script_basic_mode_without_nvml(tmp_path):
    r = subprocess.run([str(ROOT / "scripts" / "profile_gpu.sh"), "-m", "basic", "-o", str(tmp_path), "--",
                        "benchmarks", "-m", "baseline", "--llm-batch-sizes", "1", "--llm-prompt-len", "4",
                        "--llm-max-tokens", "4", "--llm-num-runs", "1", "-q", "--llm-results-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "NVML is not available here" in r.stderr
    assert "1 passed" in r.stdout
    if shutil.which("ncu"):
        return
    r = subprocess.run([str(ROOT / "scripts" / "profile_gpu.sh"), "-m", "nsight", "--", "benchmarks"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "ncu" in r.stderr


def test_torch_profile_merges_ranks(tmp_path):
    r = run_pytest(ROOT / "benchmarks", "-k", "test_tensor_parallel and tp2", "--llm-batch-sizes", "1",
                   "--llm-prompt-len", "4", "--llm-max-tokens", "3", "--llm-num-runs", "1", "--llm-warmup-runs", "0",
                   "--llm-torch-profile", "--llm-results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    (path,) = (tmp_path / "traces").glob("test_tensor_parallel_tp2-bs1-torch-*.json")
    d = json.loads(path.read_text())
    pids = {e["pid"] for e in d["traceEvents"]}
    assert {"rank 0", "rank 1"} <= pids
    assert any("all_reduce" in e.get("name", "") or "allreduce" in e.get("name", "").lower()
               for e in d["traceEvents"])
    assert not list((tmp_path / "traces").glob("*.rank*"))  # per-rank parts merged and removed


def test_gpu_counters_the_gpu_does_not_report_are_left_out_of_the_trace():
    """NVML columns a GPU does not report are NaN in the sampler: the trace leaves them out (strict
    JSON for Perfetto) rather than writing NaN."""
    from types import SimpleNamespace

    from llm_bench.tracefile import _gpu_events

    sampler = SimpleNamespace(indices=[0], times_ns=[1000], samples=[[(50.0, 8.0, float("nan"), 1700.0, 0.0)]])
    counters = [e for e in _gpu_events(sampler) if e["ph"] == "C"]
    assert counters[0]["args"] == {"util_pct": 50.0, "mem_gb": 8.0}
    json.dumps(counters, allow_nan=False)
