"""What the README promises a stored number means, pinned end to end: the real benchmarks run in a
pytest subprocess with the engine double (tests/engine_double.py) in place of the built-in engine, and
every column of "What it measures" is recomputed here from the timestamps the double logged, by the
README's definitions written out again (not through llm_bench.metrics): TTFT from submit on the host,
ITL pooled, TPOT, E2E, tok/s, MBU and its refusal above 1, speedup and scaling efficiency, overlap gain,
communication and hidden shares, what the harness costs, and where a reused copy bandwidth came from.
Also: prefetch on CPU reads the next weight in program order (so a prefetch that wrote it would change
the tokens)."""
from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_bench.storage import read_records
from overlap.streams import CPU_PREFETCH_BYTES, StreamManager
from tests.helpers import ROOT, run_pytest

PROMPT, OUT, RUNS, WARMUP, BATCH = 8, 6, 3, 1, 2
LENGTHS = ["--llm-prompt-len", PROMPT, "--llm-max-tokens", OUT, "--llm-num-runs", RUNS,
           "--llm-warmup-runs", WARMUP]
TP = str(ROOT / "benchmarks" / "test_tensor_parallel.py") + "::test_tensor_parallel"
OVERLAP = str(ROOT / "benchmarks" / "test_overlap.py") + "::test_overlap"
BASELINE = str(ROOT / "benchmarks" / "test_baseline.py")


def approx(x):
    """Equal up to float rounding: both sides compute from the same integer timestamps."""
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def _session(tmp, name: str, tests: list[str], *args, copy_bw: float | None = None):
    """One pytest session of the real benchmarks with the double: (process, stored rows by name with
    pytest-benchmark's stats under "stats", the double's log: {"describe": [...], test: [generations]})."""
    log = tmp / f"{name}.jsonl"
    (tmp / f"{name}_plugin.py").write_text(
        f"from tests.engine_double import use_double\nuse_double({str(log)!r}, {copy_bw!r})\n")
    r = run_pytest(*tests, "-p", f"{name}_plugin", *LENGTHS, *args, "--llm-results-dir", tmp / f"{name}-res",
                   f"--benchmark-json={tmp / f'{name}.json'}", cwd=tmp)
    rows = {}
    if (tmp / f"{name}.json").exists():
        rows = {b["name"]: dict(b["extra_info"], stats=b["stats"])
                for b in json.loads((tmp / f"{name}.json").read_text())["benchmarks"]}
    gens = defaultdict(list)
    for line in log.read_text().splitlines() if log.exists() else []:
        x = json.loads(line)
        gens["describe" if "describe" in x else x["test"].split("::")[-1]].append(x)
    return r, rows, gens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """TP 1 and 2, overlap `none` and `prefetch` at TP 2, one batch size, with the comm-free pass."""
    tmp = tmp_path_factory.mktemp("promises")
    r, rows, gens = _session(tmp, "main", [TP, OVERLAP], "--llm-tp-sizes", 1, 2, "--llm-batch-sizes", BATCH,
                             "--llm-overlap-modes", "none", "prefetch", "--llm-profile-communication")
    assert r.returncode == 0, r.stdout[-3000:]
    assert sorted(rows) == ["test_overlap[none-tp2-bs2]", "test_overlap[prefetch-tp2-bs2]",
                            "test_tensor_parallel[tp1-bs2]", "test_tensor_parallel[tp2-bs2]"]
    return rows, gens


# -- the definitions, written out again -----------------------------------------------------------------
def _request(submit: int, times: list[int]) -> dict:
    t = np.asarray(times, dtype=np.int64)
    ttft, e2e = (t[0] - submit) / 1e6, (t[-1] - submit) / 1e6
    return {"ttft": ttft, "e2e": e2e, "itl": list(np.diff(t) / 1e6), "n": len(t), "tpot": (e2e - ttft) / (len(t) - 1)}


def _rounds(gens: list[dict], comm_free: bool, skip: int) -> list[list[dict]]:
    """The timed rounds of one benchmark: its generations of that kind after `skip` warm-ups."""
    mine = [g for g in gens if g["comm_free"] == comm_free]
    assert len(mine) == skip + RUNS  # the warm-ups ran and are not among the rounds
    return [[_request(g["submit_ns"], ts) for ts in g["request_token_ns"]] for g in mine[skip:]]


def _p(values, q):
    return float(np.percentile(values, q))


def _expected(rounds: list[list[dict]]) -> dict:
    reqs = [q for rnd in rounds for q in rnd]
    ttft, tpot = [q["ttft"] for q in reqs], [q["tpot"] for q in reqs]
    itl = [x for q in reqs for x in q["itl"]]  # every gap of every request of every round, pooled
    tok_s = [sum(q["n"] for q in rnd) / (max(q["e2e"] for q in rnd) / 1e3) for rnd in rounds]  # batch / round E2E
    out = {f"ttft_ms_{k}": v for k, v in (("mean", np.mean(ttft)), ("p50", _p(ttft, 50)), ("p90", _p(ttft, 90)),
                                            ("p99", _p(ttft, 99)))}
    out.update({f"itl_ms_{k}": v for k, v in (("mean", np.mean(itl)), ("p50", _p(itl, 50)), ("p90", _p(itl, 90)),
                                               ("p99", _p(itl, 99)))})
    out.update(tpot_ms_mean=np.mean(tpot), tpot_ms_p50=_p(tpot, 50), e2e_ms_mean=np.mean([q["e2e"] for q in reqs]),
               tok_per_s=np.mean(tok_s), tok_per_s_rounds=tok_s, n_requests=len(reqs),
               ttft_ms_rounds=[np.mean([q["ttft"] for q in rnd]) for rnd in rounds],
               tpot_ms_rounds=[np.mean([q["tpot"] for q in rnd]) for rnd in rounds])
    return out


def _check(stored: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert stored[k] == (approx(v) if np.isscalar(v) else [approx(x) for x in v]), k


def _describe(gens, name: str) -> dict:
    """What the engine of benchmark `name` described (engines are built once per TP and mode)."""
    tp, mode = int(re.search(r"tp(\d+)", name)[1]), name.split("[")[1].split("-")[0] if "overlap" in name else "none"
    found = [d["describe"] for d in gens["describe"] if (d["describe"]["tp"], d["describe"]["overlap"]) == (tp, mode)]
    assert len(found) == 1
    return found[0]


# -- per benchmark --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_tensor_parallel[tp1-bs2]", "test_tensor_parallel[tp2-bs2]",
                                  "test_overlap[none-tp2-bs2]", "test_overlap[prefetch-tp2-bs2]"])
def test_latency_and_throughput_columns_follow_the_readme(run, name):
    """TTFT (submit to first token), ITL (pooled gaps), TPOT ((E2E - TTFT)/(n - 1)), E2E, tok/s (the
    batch's tokens over the round's E2E), per-round lists, over the timed rounds only."""
    rows, gens = run
    rounds = _rounds(gens[name], False, WARMUP)
    _check(rows[name], _expected(rounds))


@pytest.mark.parametrize("name", ["test_tensor_parallel[tp1-bs2]", "test_overlap[prefetch-tp2-bs2]"])
def test_what_the_harness_costs_and_the_rounds_pytest_benchmark_times(run, name):
    """harness_pct_of_itl = one timestamp's cost / mean ITL; transport_ms_per_round = each round's wall
    time minus submit-to-last-token, averaged; pytest-benchmark times exactly the rounds, each at least
    as long as its generation."""
    rows, gens = run
    e = rows[name]
    e2e = [max(q["e2e"] for q in rnd) for rnd in _rounds(gens[name], False, WARMUP)]
    stamp = _describe(gens, name)["timestamp_ns"]
    assert e["harness_ns_per_token"] == approx(stamp)
    assert e["harness_pct_of_itl"] == approx(stamp / (e["itl_ms_mean"] * 1e6) * 100)
    assert len(e["round_ms"]) == RUNS
    assert e["transport_ms_per_round"] == approx(np.mean([r - x for r, x in zip(e["round_ms"], e2e)]))
    assert e["stats"]["rounds"] == RUNS and e["stats"]["min"] * 1e3 >= min(e2e)


def test_ttft_starts_at_submit_on_the_host_not_at_prefill(run):
    """The double's prefill starts 2 ms after submit: TTFT counts that wait (the README's definition)."""
    rows, gens = run
    name = "test_tensor_parallel[tp1-bs2]"
    timed = [g for g in gens[name] if not g["comm_free"]][WARMUP:]
    from_start = [(ts[0] - g["start_ns"]) / 1e6 for g in timed for ts in g["request_token_ns"]]
    from_submit = [(ts[0] - g["submit_ns"]) / 1e6 for g in timed for ts in g["request_token_ns"]]
    assert all(g["start_ns"] > g["submit_ns"] for g in timed)
    assert rows[name]["ttft_ms_mean"] == approx(np.mean(from_submit))
    assert rows[name]["ttft_ms_mean"] != approx(np.mean(from_start))


def test_mbu_is_bytes_per_step_over_tpot_over_copy_bandwidth(run):
    """MBU = (weight shard + KV cache of the batch at the mean decode context) / TPOT p50 / the copy
    bandwidth the engine reported."""
    rows, gens = run
    for name in ("test_tensor_parallel[tp1-bs2]", "test_overlap[prefetch-tp2-bs2]"):
        d, e = _describe(gens, name), rows[name]
        per_step = d["weight_bytes_per_step"] + d["kv_bytes_per_token"] * BATCH * (PROMPT + OUT / 2)
        bw = min(d["copy_bw_bytes_per_s"])
        assert e["bytes_per_step_gb"] == approx(per_step / 1e9)
        assert e["copy_bw_tbps"] == approx(bw / 1e12)
        assert e["mbu"] == approx(per_step / (e["tpot_ms_p50"] / 1e3) / bw)


def test_a_reused_copy_bandwidth_says_where_and_when_it_was_measured(run):
    """The first engine measures the bandwidth; later engines are handed it and say so, and their rows
    name the engine and the time it was measured."""
    rows, gens = run
    first = _describe(gens, "test_tensor_parallel[tp1-bs2]")
    assert not first["copy_bw_reused"]
    assert "copy_bw_source" not in rows["test_tensor_parallel[tp1-bs2]"]
    for name in ("test_tensor_parallel[tp2-bs2]", "test_overlap[none-tp2-bs2]", "test_overlap[prefetch-tp2-bs2]"):
        later = _describe(gens, name)
        assert later["copy_bw_reused"] and later["copy_bw_bytes_per_s"][0] == first["copy_bw_bytes_per_s"][0]
        assert re.fullmatch(r"measured by builtin:tiny:tp1:none at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
                            rows[name]["copy_bw_source"]), rows[name].get("copy_bw_source")
        assert rows[name]["copy_bw_tbps"] == rows["test_tensor_parallel[tp1-bs2]"]["copy_bw_tbps"]


# -- across benchmarks of the run -----------------------------------------------------------------------
def test_speedup_and_scaling_efficiency_come_from_the_tpot_of_the_smallest_tp(run):
    rows, gens = run
    t1 = _expected(_rounds(gens["test_tensor_parallel[tp1-bs2]"], False, WARMUP))
    t2 = _expected(_rounds(gens["test_tensor_parallel[tp2-bs2]"], False, WARMUP))
    e1, e2 = rows["test_tensor_parallel[tp1-bs2]"], rows["test_tensor_parallel[tp2-bs2]"]
    assert e1["scaling_base_tp"] == e2["scaling_base_tp"] == 1
    assert e1["speedup"] == 1 and e1["scaling_efficiency"] == 1
    assert e2["speedup"] == approx(t1["tpot_ms_p50"] / t2["tpot_ms_p50"])
    assert e2["scaling_efficiency"] == approx(t1["tpot_ms_p50"] / t2["tpot_ms_p50"] * 1 / 2)
    assert e2["throughput_ratio"] == approx(t2["tok_per_s"] / t1["tok_per_s"])


def _share(t: float, cf: float):
    return (t - cf) / t if cf <= t else None


def test_overlap_gain_and_communication_shares(run):
    """Gain = T(none) / T(mode) - 1 (TPOT for decode, TTFT for prefill); comm share = (T - T_comm_free)
    / T from the comm-free rounds; hidden share = 1 - exposed(mode) / exposed(none), stored only inside
    [0, 1] (a note says why otherwise)."""
    rows, gens = run
    t, cf = {}, {}
    for name in rows:
        if "tp2" in name:
            t[name] = _expected(_rounds(gens[name], False, WARMUP))
            cf[name] = _expected(_rounds(gens[name], True, max(1, WARMUP)))
            e = rows[name]
            assert e["tpot_ms_comm_free"] == approx(cf[name]["tpot_ms_p50"])
            assert e["ttft_ms_comm_free"] == approx(cf[name]["ttft_ms_p50"])
            for col, key in (("comm_share", "tpot_ms_p50"), ("prefill_comm_share", "ttft_ms_p50")):
                want = _share(t[name][key], cf[name][key])
                if want is None:
                    assert col not in e and "slower than the real run" in e[col + "_note"]
                else:
                    assert e[col] == approx(want)
    none, mode = "test_overlap[none-tp2-bs2]", "test_overlap[prefetch-tp2-bs2]"
    e = rows[mode]
    assert rows[none]["overlap_gain"] == 0
    assert e["overlap_gain"] == approx(t[none]["tpot_ms_p50"] / t[mode]["tpot_ms_p50"] - 1)
    assert e["prefill_overlap_gain"] == approx(t[none]["ttft_ms_p50"] / t[mode]["ttft_ms_p50"] - 1)
    for col, key in (("comm_hidden_share", "tpot_ms_p50"), ("prefill_comm_hidden_share", "ttft_ms_p50")):
        exposed_none = t[none][key] - cf[none][key]
        exposed_mode = t[mode][key] - cf[mode][key]
        if exposed_none > 0 and 0 <= exposed_mode <= exposed_none:
            assert e[col] == approx(1 - exposed_mode / exposed_none)
        else:
            assert col not in e and e[col + "_note"]


def test_an_impossible_mbu_fails_the_benchmark_and_is_not_stored(tmp_path):
    """A copy bandwidth of 1 kB/s makes every MBU far above 1: the benchmark fails with the reason and
    nothing of it is stored, neither in the JSON nor in the live results file."""
    r, rows, gens = _session(tmp_path, "tinybw", [BASELINE], "--llm-tp-sizes", 1, "--llm-batch-sizes", 1,
                             copy_bw=1e3)
    assert r.returncode == 1, r.stdout[-3000:]
    refused = r"MeasurementError: bandwidth use \d+\.\d+ > 1\.0 of the measured peak"
    assert re.search(refused, r.stdout), r.stdout[-3000:]
    assert len([g for g in gens["test_baseline[bs1]"] if not g["comm_free"]]) == WARMUP + RUNS  # it did measure
    assert rows == {}
    live = tmp_path / "tinybw-res" / "runs.jsonl"
    assert not live.exists() or read_records(str(live)) == []


# -- prefetch on CPU ------------------------------------------------------------------------------------
class _Reads(TorchDispatchMode):
    """The non-view ops that ran and the (address, elements) of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.reads += [(a.data_ptr(), a.numel()) for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, budget, elements", [
    ("prefetch", None, CPU_PREFETCH_BYTES // 4),  # default: 1 MiB of a 4 MiB fp32 weight
    ("full", 4096, 1024),                          # --prefetch-mb honoured
    ("none", None, 0), ("pipeline", None, 0)])
def test_prefetch_reads_the_next_weight_in_line_on_cpu(mode, budget, elements):
    sm = StreamManager(torch.device("cpu"), mode, prefetch_bytes=budget)
    w = torch.randn(1024, 1024)
    before = w.clone()
    with _Reads() as log:
        sm.prefetch(w)
    assert sm.prefetch_bytes == elements * 4
    assert log.reads == ([(w.data_ptr(), elements)] if elements else [])
    assert torch.equal(w, before)
