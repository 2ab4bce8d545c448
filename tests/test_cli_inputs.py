"""Every bad input to `llm-bench` is one line on stderr and a documented exit status (2: usage or data
error; gate: 1 regression, 3 cannot decide), never a traceback and never a silent pass. Each case
builds its input from a valid run, breaks one thing, and says what the user must see."""
import copy
import json
import os

import numpy as np
import pytest

from llm_bench.cli import main

FP = {"fingerprint": "gpu-a", "gpu_names": ["Test GPU"], "gpu_count": 2}


def _bench(name: str, tp: int, tpot: float, n: int = 10, **extra) -> dict:
    rounds = [tpot * (1 + 0.001 * i) for i in range(n)]
    e = {"engine": "builtin", "model": "tiny", "tp": tp, "batch_size": 1, "overlap": "none",
         "tpot_ms_p50": float(np.median(rounds)), "tpot_ms_rounds": rounds, "ttft_ms_p50": 2 * tpot,
         "ttft_ms_rounds": [2 * x for x in rounds], **extra}
    return {"name": name, "fullname": f"benchmarks/test_tensor_parallel.py::{name}", "extra_info": e}


def valid_run(tpot: float = 5.0, n: int = 10) -> dict:
    return {"machine_info": {"gpu": dict(FP)},
            "benchmarks": [_bench("test_tensor_parallel[tp1-bs1]", 1, tpot, n),
                           _bench("test_tensor_parallel[tp2-bs1]", 2, tpot * 0.6, n),
                           {"name": "test_allreduce_latency[tp2-bs1]",
                            "fullname": "benchmarks/test_tensor_parallel.py::test_allreduce_latency[tp2-bs1]",
                            "extra_info": {"tp": 2, "batch_size": 1, "allreduce_us_p50": 8.0, "busbw_gbps": 1.1,
                                           "allreduce_us_rounds": [8.0, 8.1, 7.9]}}]}


def _write(path, doc) -> str:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _broken(tmp, edit) -> str:
    run = valid_run()
    edit(run)
    return _write(tmp / "broken.json", run)


def _records(tmp, sessions=("20261126-100000-aaaaaa", "20261126-110000-bbbbbb"), tail="") -> str:
    lines = []
    for i, s in enumerate(sessions):
        for b in valid_run(5.0 + i)["benchmarks"]:
            lines.append(json.dumps({"session": s, "time": 1.0, **b}))
    return _write(tmp / "runs.jsonl", "\n".join(lines) + "\n" + tail)


def _trace(tmp, edit=None) -> str:
    ev = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "requests"}},
          {"name": "batch", "ph": "X", "pid": 1, "tid": 1, "ts": 10.0, "dur": 100.0},
          {"name": "decode", "ph": "X", "pid": 1, "tid": 1, "ts": 20.0, "dur": 5.0, "args": {"step": 1}},
          {"name": "step", "ph": "X", "pid": 2, "tid": 1, "ts": 20.0, "dur": 5.0, "args": {"round": 0, "step": 1}}]
    if edit:
        edit(ev)
    return _write(tmp / "trace.json", {"traceEvents": ev})


def _del(d: dict, key: str):
    del d[key]


def _set(d: dict, key: str, value):
    d[key] = value


def _first(run):
    return run["benchmarks"][0]


def _ei(run):
    return run["benchmarks"][0]["extra_info"]


# (id, argv builder(tmp) -> list, exit status, text in the one line on stderr)
CASES = [
    # gate: never passes silently
    ("gate unknown metric", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                       _write(t / "b.json", valid_run(10.0)), "--metric", "tpot_ms_p5:5%"], 2,
     "unknown metric 'tpot_ms_p5'; known: tpot_ms_p50"),
    ("gate NaN threshold", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                      _write(t / "b.json", valid_run(10.0)), "--metric", "tpot_ms_p50:nan"], 2,
     "finite number above 0"),
    ("gate zero threshold", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()),
                                       "--metric", "tpot_ms_p50:0"], 2, "finite number above 0"),
    ("gate negative threshold", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()),
                                           "--metric", "ttft_ms_p50:-5%"], 2, "finite number above 0"),
    ("gate alpha -1", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                 _write(t / "b.json", valid_run(10.0)), "--alpha", "-1"], 2, "between 0 and 1"),
    ("gate alpha nan", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--alpha", "nan"], 2,
     "between 0 and 1"),
    ("gate alpha 1.5", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--alpha", "1.5"], 2,
     "between 0 and 1"),
    ("gate alpha not a number", lambda t: ["gate", "--baseline", "x", "--alpha", "five"], 2,
     "argument --alpha: invalid float value: 'five'"),
    ("gate without --baseline", lambda t: ["gate"], 2, "the following arguments are required: --baseline"),
    ("gate NaN candidate value", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                            _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", float("nan")))], 2,
     "broken.json: test_tensor_parallel[tp1-bs1]: extra_info 'tpot_ms_p50' is nan, not a finite number"),
    ("gate 3 rounds a side", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run(n=3)), "--candidate",
                                        _write(t / "b.json", valid_run(10.0, n=3))], 3, None),
    ("gate interrupted benchmark (empty extra_info)",
     lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                _broken(t, lambda r: _set(_first(r), "extra_info", {}))], 2, None),
    ("gate different GPUs", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                       _broken(t, lambda r: _set(r["machine_info"]["gpu"], "fingerprint", "gpu-b"))],
     2, "GPU fingerprints differ: baseline gpu-a"),
    ("gate candidate runs.jsonl of 2 sessions", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()),
                                                           "--candidate", _records(t)], 2, "holds 2 runs"),
    ("gate candidate runs.jsonl (no GPU fingerprint)",
     lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                _records(t, sessions=("s1",))], 2, "candidate unknown (no machine_info.gpu)"),
    ("gate one baseline run twice",
     lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), str(t / "a.json"),
                "--candidate", _write(t / "b.json", valid_run(10.0))], 2, "a.json is the same run as"),
    ("gate a baseline and its copy", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()),
                                                _write(t / "copy.json", valid_run()), "--candidate",
                                                _write(t / "b.json", valid_run(10.0))], 2,
     "copy.json is the same run as"),
    ("gate unwritable --json", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                          str(t / "a.json"), "--json", str(t / "no" / "v.json")], 2,
     "cannot write"),
    # compare
    ("compare unknown --columns", lambda t: ["compare", _write(t / "a.json", valid_run()), "--columns", "tpot,ttft"],
     2, "unknown column 'tpot', 'ttft'"),
    ("compare unknown --group-by", lambda t: ["compare", _write(t / "a.json", valid_run()), "--group-by", "tensor"],
     2, "unknown column 'tensor'"),
    ("compare no benchmark in common",
     lambda t: ["compare", _write(t / "a.json", valid_run()),
                _broken(t, lambda r: [_set(b, "fullname", b["fullname"] + "x") for b in r["benchmarks"]])], 2,
     "no benchmark in common"),
    ("compare id names a folder", lambda t: ["compare", "--storage", str(_storage(t)), "H200x2"], 2,
     "names a folder"),
    ("compare path is a folder", lambda t: ["compare", str(_storage(t) / "H200x2")], 2, "is a folder, not a run"),
    ("compare id matches several runs", lambda t: ["compare", "--storage", str(_storage(t)), "*"], 2,
     "matches 3 runs"),
    ("compare id matches two machines", lambda t: ["compare", "--storage", str(_storage(t)), "0001"], 2,
     "matches 2 runs"),
    ("compare id not found", lambda t: ["compare", "--storage", str(_storage(t)), "0009"], 2, "run '0009' not found"),
    ("compare unwritable --csv", lambda t: ["compare", _write(t / "a.json", valid_run()), "--csv",
                                            str(t / "a.json" / "x.csv")], 2, "cannot write"),
    ("compare unwritable --json", lambda t: ["compare", _write(t / "a.json", valid_run()), "--json",
                                             str(t / "missing" / "x.json")], 2, "cannot write"),
    ("compare --csv - and --json -", lambda t: ["compare", _write(t / "a.json", valid_run()), "--csv", "-",
                                                "--json", "-"], 2, "both ask for stdout"),
    # report
    ("a p50 above the max of the same values",
     lambda t: ["compare", _broken(t, lambda r: _ei(r).update(ttft_ms_p50=1e308, ttft_ms_max=9.0))], 2,
     "extra_info 'ttft_ms_p50' (1e+308) is above 'ttft_ms_max' (9.0): summaries of one distribution out of order"),
    ("compare with no numbered run stored", lambda t: ["compare", "--storage", str(t / "empty")], 2,
     "empty/*/ to take the latest from: name the runs (files, or ids like 0001)"),
    ("report of runs with nothing measured",
     lambda t: ["report", _broken(t, lambda r: [b.update(extra_info={}) for b in r["benchmarks"]]), "--out",
                str(t / "r")], 2, "holds a measurement"),
    ("report unwritable --out", lambda t: ["report", _write(t / "a.json", valid_run()), "--out",
                                           str(t / "a.json" / "report")], 2, "cannot write the report"),
    # data errors, through compare (every command reads runs the same way)
    ("metric value a string", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", "fast"))], 2,
     "extra_info 'tpot_ms_p50' is 'fast', not a number"),
    ("metric value null", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "ttft_ms_p50", None))], 2,
     "extra_info 'ttft_ms_p50' is None, not a number"),
    ("metric value true", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "mbu", True))], 2,
     "extra_info 'mbu' is True, not a number"),
    ("rounds hold a string", lambda t: ["gate", "--baseline", _broken(t, lambda r: _set(_ei(r), "tpot_ms_rounds",
                                                                                        [1.0, "2"]))], 2,
     "not a list of numbers"),
    ("tp a string", lambda t: ["report", _broken(t, lambda r: _set(_ei(r), "tp", "2")), "--out", str(t / "r")], 2,
     "extra_info 'tp' is '2', not a positive integer"),
    ("benchmark without name", lambda t: ["compare", _broken(t, lambda r: _del(_first(r), "name"))], 2,
     "benchmark 0 has no 'name'"),
    ("benchmark without fullname", lambda t: ["gate", "--baseline", _broken(t, lambda r: _del(_first(r), "fullname"))],
     2, "benchmark 0 has no 'fullname'"),
    ("extra_info a list", lambda t: ["compare", _broken(t, lambda r: _set(_first(r), "extra_info", [1]))], 2,
     "'extra_info' is [1], not an object"),
    ("machine_info.gpu a string", lambda t: ["gate", "--baseline", _broken(t, lambda r: _set(r["machine_info"], "gpu",
                                                                                             "H200"))], 2,
     "'machine_info.gpu' is 'H200', not an object"),
    ("machine_info a list", lambda t: ["compare", _broken(t, lambda r: _set(r, "machine_info", []))], 2,
     "'machine_info' is [], not an object"),
    ("benchmarks not a list", lambda t: ["compare", _write(t / "a.json", {"benchmarks": {}})], 2,
     "not a pytest-benchmark run"),
    ("a run without benchmarks", lambda t: ["report", _write(t / "a.json", {"benchmarks": []}), "--out", str(t / "r")],
     2, "holds no benchmark (every benchmark skipped or deselected?)"),
    ("a run whose benchmarks were all interrupted",
     lambda t: ["compare", _write(t / "a.json", {"benchmarks": [], "llm_bench_dropped": ["test_baseline[bs1]"]})], 2,
     "holds no benchmark (interrupted: test_baseline[bs1] not stored)"),
    ("not JSON", lambda t: ["compare", _write(t / "a.json", '{"benchmarks": [')], 2, "not valid JSON"),
    ("not text", lambda t: ["compare", _bytes(t / "a.json", b"\xff\xfe\x00\x01")], 2, "not text"),
    ("no such file", lambda t: ["compare", str(t / "nope.json")], 2, "not found"),
    ("another tool's JSON", lambda t: ["compare", _write(t / "a.json", {"peer": "hf"})], 2,
     "not a pytest-benchmark run"),
    # numbers that cannot be true are refused where a run is read, naming file, benchmark and field
    ("MBU above 1", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "mbu", 3.5))], 2,
     "broken.json: test_tensor_parallel[tp1-bs1]: extra_info 'mbu' is 3.5, out of range (MBU is in (0, 1])"),
    ("TPOT negative", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", -5.0))], 2,
     "extra_info 'tpot_ms_p50' is -5.0, out of range (a time or a rate is above 0)"),
    ("TPOT zero", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", 0.0))], 2,
     "extra_info 'tpot_ms_p50' is 0.0, out of range"),
    ("TTFT infinite", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "ttft_ms_p50", float("inf")))], 2,
     "extra_info 'ttft_ms_p50' is inf, not a finite number"),
    ("comm-free time a string", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "tpot_ms_comm_free", "x"))], 2,
     "extra_info 'tpot_ms_comm_free' is 'x', not a number"),
    ("comm-free time infinite", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "tpot_ms_comm_free",
                                                                                float("inf")))], 2,
     "extra_info 'tpot_ms_comm_free' is inf, not a finite number"),
    ("a share above 1", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "clock_held_down_share", 1.5))], 2,
     "extra_info 'clock_held_down_share' is 1.5, out of range (a share is in [0, 1])"),
    ("prompt_len a list", lambda t: ["compare", _broken(t, lambda r: _set(_ei(r), "prompt_len", [128]))], 2,
     "extra_info 'prompt_len' is [128], not a positive integer"),
    ("output_len zero", lambda t: ["report", _broken(t, lambda r: _set(_ei(r), "output_len", 0)), "--out",
                                   str(t / "r")], 2, "extra_info 'output_len' is 0, not a positive integer"),
    ("an integer too large for a float", lambda t: ["compare", _write(t / "big.json", json.dumps(valid_run()).replace(
        '"ttft_ms_p50": 10.0', '"ttft_ms_p50": 1' + "0" * 400, 1))], 2,
     "extra_info 'ttft_ms_p50' is 1" + "0" * 36 + "..., not a finite number"),
    ("negative rounds", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                   _broken(t, lambda r: [_set(_ei(r), "tpot_ms_p50", -1.0),
                                                         _set(_ei(r), "tpot_ms_rounds", [-1.0] * 10)])], 2,
     "extra_info 'tpot_ms_p50' is -1.0, out of range"),
    ("rounds holding 0", lambda t: ["gate", "--baseline", _broken(t, lambda r: _set(_ei(r), "tpot_ms_rounds",
                                                                                    [5.0, 0.0, 5.0]))], 2,
     "extra_info 'tpot_ms_rounds' is [5.0, 0.0, 5.0], holding 0.0, out of range"),
    ("gate candidate TPOT 0", lambda t: ["gate", "--baseline", _write(t / "a.json", valid_run()), "--candidate",
                                         _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", 0))], 2,
     "extra_info 'tpot_ms_p50' is 0, out of range"),
    ("gate baseline TPOT -1", lambda t: ["gate", "--baseline", _broken(t, lambda r: _set(_ei(r), "tpot_ms_p50", -1)),
                                         "--candidate", _write(t / "b.json", valid_run())], 2,
     "extra_info 'tpot_ms_p50' is -1, out of range"),
    ("runs.jsonl with TPOT 0", lambda t: ["compare", _write(t / "runs.jsonl", json.dumps(
        {"session": "s", **_bench("test_tensor_parallel[tp1-bs1]", 1, 0.0)}) + "\n")], 2,
     "runs.jsonl#s: test_tensor_parallel[tp1-bs1]: extra_info 'tpot_ms_p50' is 0.0, out of range"),
    ("report of MBU above 1", lambda t: ["report", _broken(t, lambda r: _set(_ei(r), "mbu", 3.5)), "--out",
                                         str(t / "r")], 2, "extra_info 'mbu' is 3.5, out of range"),
    # hostile JSON
    ("JSON nested 200000 deep", lambda t: ["compare", _write(t / "deep.json", "[" * 200000)], 2,
     "deep.json: not valid JSON (nested too deeply to read)"),
    ("gate baseline nested 200000 deep", lambda t: ["gate", "--baseline", _write(t / "deep.json", "[" * 200000)], 2,
     "deep.json: not valid JSON (nested too deeply to read)"),
    ("JSON integer of 5000 digits",
     lambda t: ["compare", _write(t / "big.json", '{"benchmarks": [' + "9" * 5000 + "]}")], 2,
     "big.json: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion)"),
    ("runs.jsonl of one line nested 200000 deep", lambda t: ["compare", _write(t / "runs.jsonl", "[" * 200000)], 2,
     "runs.jsonl: no readable record (line 1 not JSON)"),
    ("trace nested 200000 deep", lambda t: ["trace", _write(t / "deep.json", "[" * 200000)], 2,
     "deep.json: cannot read trace (nested too deeply)"),
    ("trace integer of 5000 digits", lambda t: ["trace", _write(t / "big.json", "[" + "9" * 5000 + "]")], 2,
     "big.json: cannot read trace (Exceeds the limit (4300 digits) for integer string conversion)"),
    # an empty file: a run that stored nothing
    ("empty --benchmark-json file", lambda t: ["compare", _write(t / "run.json", "")], 2,
     "run.json: empty: the run stored nothing (interrupted, all skipped, or a usage error)"),
    ("empty runs.jsonl", lambda t: ["gate", "--baseline", _write(t / "runs.jsonl", "\n")], 2,
     "runs.jsonl: empty: the run stored nothing"),
    ("empty trace", lambda t: ["trace", _write(t / "trace.json", "")], 2, "trace.json: empty"),
    # the live results file
    ("runs.jsonl record without session", lambda t: ["compare", _write(t / "runs.jsonl", '{"name": "x"}\n')], 2,
     "line 1: not a runs.jsonl record"),
    ("runs.jsonl unknown session", lambda t: ["compare", _records(t) + "#zzz"], 2, "session 'zzz' not found"),
    ("runs.jsonl record without name", lambda t: ["compare", _write(t / "runs.jsonl", '{"session": "a", "fullname": '
                                                                                      '"f", "extra_info": {}}\n')], 2,
     "runs.jsonl#a: benchmark 0 has no 'name'"),
    # trace
    ("trace event without dur", lambda t: ["trace", _trace(t, lambda ev: _del(ev[2], "dur"))], 2,
     "event 2 ('decode') has dur None, not a finite number"),
    ("trace string tid", lambda t: ["trace", _trace(t, lambda ev: _set(ev[3], "tid", "1"))], 2,
     "event 3 (rank step) has tid '1'"),
    ("trace event not an object", lambda t: ["trace", _trace(t, lambda ev: ev.append(3))], 2,
     "event 4 is int, not an object"),
    ("trace of another tool", lambda t: ["trace", _write(t / "x.json", {"traceEvents": []})], 2,
     "not a parallel-llm-bench trace"),
    ("trace missing file", lambda t: ["trace", str(t / "none.json")], 2, "cannot read trace"),
    ("trace GPU counter named by a list", lambda t: ["trace", _trace(t, lambda ev: ev.append(
        {"name": ["gpu0"], "ph": "C", "pid": 4, "tid": 0, "ts": 30.0, "args": {"util_pct": 50.0}}))], 2,
     "event 4 (GPU counter) has name ['gpu0'], not a string"),
    ("trace GPU counter without name", lambda t: ["trace", _trace(t, lambda ev: ev.append(
        {"ph": "C", "pid": 4, "tid": 0, "ts": 30.0, "args": {"util_pct": 50.0}}))], 2,
     "event 4 (GPU counter) has name None, not a string"),
    ("trace GPU counter infinite", lambda t: ["trace", _trace(t, lambda ev: ev.append(
        {"name": "gpu0", "ph": "C", "pid": 4, "tid": 0, "ts": 30.0, "args": {"util_pct": float("inf")}}))], 2,
     "event 4 (GPU counter) has args {'util_pct': inf}, not finite numbers"),
    ("trace dur too large for a float", lambda t: ["trace", _trace(t, lambda ev: _set(ev[2], "dur", 10 ** 400))], 2,
     "event 2 ('decode') has dur 1000000000000"),
    ("trace of two sessions merged", lambda t: ["trace", _trace(t, lambda ev: ev.extend(json.loads(json.dumps(ev))))],
     2, "2 traces in one file"),
    ("trace of a rank step twice", lambda t: ["trace", _trace(t, lambda ev: ev.append(dict(ev[3], ts=900.0)))], 2,
     "rank 0's step 1 of round 0 appears twice"),
    ("trace without rounds", lambda t: ["trace", _trace(t, lambda ev: ev.pop(1))], 2, "no request rounds"),
    ("trace ts past 2**53 us", lambda t: ["trace", _trace(t, lambda ev: _set(ev[3], "ts", 1e300))], 2,
     "beyond 2**53 us"),
    ("trace negative dur", lambda t: ["trace", _trace(t, lambda ev: _set(ev[2], "dur", -1000.0))], 2,
     "event 2 ('decode') has dur -1000.0: a span cannot last less than 0"),
    # the command line itself
    ("unknown subcommand", lambda t: ["bogus"], 2, "invalid choice: 'bogus'"),
    ("unknown option", lambda t: ["compare", "--colums", "x"], 2, "unrecognized arguments: --colums"),
]


def _bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _storage(tmp):
    """pytest-benchmark storage with the same id on two machines and a third run."""
    s = tmp / "storage"
    for d, f in (("H200x2", "0001_abc_20261126.json"), ("H200x4", "0001_abc_20261126.json"),
                 ("H200x4", "0002_def_20261127.json")):
        (s / d).mkdir(parents=True, exist_ok=True)
        _write(s / d / f, valid_run())
    return s


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_its_exit_status(tmp_path, capsys, case):
    _, argv, status, says = case
    args = argv(tmp_path)
    capsys.readouterr()
    assert main(args) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if status == 2:  # usage and data errors: one line, the cause
        assert len(lines) == 1 and lines[0].startswith("llm-bench") and "Traceback" not in err, err
    else:  # the gate's verdicts are on stdout, first line
        assert "Traceback" not in err
    if says:
        assert says in err, err


def test_gate_verdicts_name_themselves_on_the_first_line(tmp_path, capsys):
    for base, cand, status, first in ((valid_run(), valid_run(), 0, "PASS"),
                                      (valid_run(), valid_run(10.0), 1, "REGRESSED"),
                                      (valid_run(n=3), valid_run(n=3), 3, "CANNOT DECIDE")):
        a, b = _write(tmp_path / "a.json", base), _write(tmp_path / "b.json", cand)
        assert main(["gate", "--baseline", a, "--candidate", b]) == status
        out = capsys.readouterr().out
        assert out.startswith(f"llm-bench gate: {first}"), out


def test_runs_jsonl_is_read_as_one_run_per_session(tmp_path, capsys):
    """results/runs.jsonl (one record per line: "Extra data" to a JSON reader) is accepted: each
    session is a run, labelled with its id; the columns across benchmarks are derived as for JSON."""
    path = _records(tmp_path, tail='{"session": "20261126-110000-bbbbbb", "na')  # a crash cut the last line
    assert main(["compare", path, "--columns", "tpot_ms_p50,scaling_efficiency", "--json", "-"]) == 0
    cap = capsys.readouterr()
    assert "runs.jsonl: skipped line 7, not JSON (cut short" in cap.err and len(cap.err.strip().splitlines()) == 1
    rows = json.loads(cap.out)
    runs = sorted({r["path"] for r in rows})
    assert runs == [f"{path}#20261126-100000-aaaaaa", f"{path}#20261126-110000-bbbbbb"]
    tp2 = [r for r in rows if r["benchmark"] == "test_tensor_parallel[tp2-bs1]"]
    assert [round(r["scaling_efficiency"], 3) for r in tp2] == [round(1 / 0.6 / 2, 3)] * 2
    assert tp2[1]["tpot_ms_p50_change"] == pytest.approx(0.2, rel=1e-3) and tp2[1]["tpot_ms_p50_verdict"] == "worse"
    # one session by its id (a prefix is enough), and the same file under another name
    assert main(["compare", path + "#20261126-11"]) == 0
    assert "bbbbbb" in capsys.readouterr().out
    other = tmp_path / "records.json"
    other.write_text((tmp_path / "runs.jsonl").read_text())
    assert main(["compare", str(other)]) == 0


def test_compare_json_dash_is_stdout_and_not_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _write(tmp_path / "a.json", valid_run())
    assert main(["compare", a, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run"] == "a"
    assert main(["compare", a, "--csv", "-"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("run,path,benchmark,")
    assert not os.path.exists(tmp_path / "-")


def test_compare_says_better_worse_or_noise(tmp_path, capsys):
    base = valid_run()
    slower = copy.deepcopy(base)
    for b in slower["benchmarks"][:2]:  # TPOT 20% worse, rounds apart; TTFT 0.1% better, rounds overlap
        e = b["extra_info"]
        e["tpot_ms_rounds"] = [x * 1.2 for x in e["tpot_ms_rounds"]]
        e["tpot_ms_p50"] *= 1.2
        e["ttft_ms_p50"] *= 0.999
        e["tok_per_s"] = 100.0
    for b in base["benchmarks"][:2]:
        b["extra_info"]["tok_per_s"] = 90.0
    a, b = _write(tmp_path / "a.json", base), _write(tmp_path / "b.json", slower)
    assert main(["compare", a, b, "--columns", "tpot_ms_p50,ttft_ms_p50,tok_per_s"]) == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.startswith("b ") and "tp1-bs1" in x)
    assert "(+20.0% worse)" in row and "(-0.1% noise)" in row and "(+11.1% better?)" in row, row
    assert "lower is better" in out and "better/worse: the runs' per-round values do not overlap" in out


def test_compare_does_not_compare_efficiency_against_another_base_tp(tmp_path, capsys):
    """A run that lost its TP=1 row derives TP=2's efficiency against TP=2 (1.0): shown, but its change
    against a run whose base is TP=1 is not a number to read (was '1.00 (+66.7% better?)')."""
    full = valid_run()
    no_tp1 = copy.deepcopy(full)
    no_tp1["benchmarks"] = no_tp1["benchmarks"][1:]
    a, b = _write(tmp_path / "a.json", full), _write(tmp_path / "b.json", no_tp1)
    assert main(["compare", a, b, "--columns", "tpot_ms_p50,scaling_efficiency"]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("b ") and "parallel[tp2-bs1]" in x)
    assert "not comparable: base TP 1 vs 2" in row and "better" not in row and "(+0.0%" in row, row


def test_version(capsys):
    from llm_bench import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llm-bench {__version__}"


def test_stored_derived_columns_are_derived_again(tmp_path, capsys):
    """A file that says comm_share 7 (700%), hidden share -2 and efficiency 9 is not believed: those
    columns are derived again from the checked times, as the plugin derives them."""
    run = valid_run()
    e1, e2 = run["benchmarks"][0]["extra_info"], run["benchmarks"][1]["extra_info"]
    e1.update(comm_share=7.0, comm_hidden_share=-2.0, scaling_efficiency=9.0)
    e2.update(tpot_ms_comm_free=e2["tpot_ms_p50"] * 0.75, comm_share=7.0)
    path = _write(tmp_path / "a.json", run)
    assert main(["compare", path, "--json", "-"]) == 0
    rows = {r["benchmark"]: r for r in json.loads(capsys.readouterr().out)}
    tp1, tp2 = rows["test_tensor_parallel[tp1-bs1]"], rows["test_tensor_parallel[tp2-bs1]"]
    assert tp1["comm_share"] is None and tp1["comm_hidden_share"] is None and tp1["scaling_efficiency"] == 1.0
    assert tp2["comm_share"] == pytest.approx(0.25) and tp2["scaling_efficiency"] == pytest.approx(1 / 0.6 / 2)
    assert main(["compare", path]) == 0
    out = capsys.readouterr().out
    assert "700%" not in out and "-200%" not in out and "25%" in out


def test_gate_that_cannot_write_its_json_shows_no_verdict(tmp_path, capsys):
    a = _write(tmp_path / "a.json", valid_run())
    assert main(["gate", "--baseline", a, "--candidate", a, "--json", str(tmp_path / "no" / "v.json")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "PASS" not in cap.err, cap
    assert cap.err.startswith("llm-bench gate: cannot write") and len(cap.err.strip().splitlines()) == 1


def test_latest_run_across_machine_folders_is_the_latest_written(tmp_path, capsys):
    """Two machine folders each end with a 0002 run: the latest is the one pytest-benchmark wrote last
    (its `datetime`), not the one whose name sorts last; a tie, or no datetime, is refused naming both."""
    s = tmp_path / "storage"
    (s / "A").mkdir(parents=True)
    (s / "B").mkdir()
    old, new = valid_run(5.0), valid_run(7.0)
    _write(s / "A" / "0001_x.json", dict(valid_run(1.0), datetime="2026-11-28T09:00:00+00:00"))
    _write(s / "A" / "0002_x.json", dict(new, datetime="2026-11-27T10:00:00+00:00"))
    _write(s / "B" / "0002_y.json", dict(old, datetime="2026-11-26T10:00:00+00:00"))
    assert main(["compare", "--storage", str(s), "--json", "-"]) == 0
    assert {r["path"] for r in json.loads(capsys.readouterr().out)} == {str(s / "A" / "0002_x.json")}
    _write(s / "B" / "0002_y.json", dict(old, datetime="2026-11-27T11:00:00+01:00"))  # the same instant
    assert main(["gate", "--storage", str(s), "--baseline", str(s / "A" / "0001_x.json")]) == 2
    err = capsys.readouterr().err
    assert "0002_x.json" in err and "0002_y.json" in err and "have the same datetime" in err, err
    _write(s / "B" / "0002_y.json", old)
    assert main(["compare", "--storage", str(s)]) == 2
    err = capsys.readouterr().err
    assert "B/0002_y.json has no readable 'datetime'" in err and len(err.strip().splitlines()) == 1, err


def test_a_crash_cut_line_in_runs_jsonl_loses_only_itself(tmp_path, capsys):
    """A crash cut session 1's last record short; session 2 appends after it. Its record starts on a
    line of its own, and the reader skips the damaged line with one warning naming it."""
    from llm_bench.storage import append_record, read_records

    path = str(tmp_path / "runs.jsonl")
    b1, b2 = valid_run()["benchmarks"][:2]
    append_record(path, {"session": "s1", **b1})
    with open(path, "a") as f:
        f.write(json.dumps({"session": "s1", **b2})[:50])  # the crash: no newline
    append_record(path, {"session": "s2", **b1})
    append_record(path, {"session": "s2", **b2})
    assert [r["session"] for r in read_records(path)] == ["s1", "s2", "s2"]
    err = capsys.readouterr().err
    assert err == f"llm-bench: warning: {path}: skipped line 2, not JSON (cut short by a crash while writing?)\n"
    assert main(["compare", path + "#s2"]) == 0  # a damaged line between two good ones does not reject the file
    assert "test_tensor_parallel[tp2-bs1]" in capsys.readouterr().out


def test_trace_comm_free_note_is_in_milliseconds(tmp_path, capsys):
    """Spans are stored in microseconds; the share's note speaks milliseconds: 60 ms, not 6e+04."""
    def edit(ev):
        ev[2]["dur"] = 55800.0
        ev.append({"name": "process_name", "ph": "M", "pid": 3, "tid": 0, "args": {"name": "comm-free"}})
        ev.append({"name": "decode", "ph": "X", "pid": 3, "tid": 1, "ts": 20.0, "dur": 60000.0})
    assert main(["trace", _trace(tmp_path, edit), "--json"]) == 0
    s = next(iter(json.loads(capsys.readouterr().out).values()))
    assert s["decode_step_ms_p50"] == pytest.approx(55.8) and s["comm_free_step_ms_p50"] == pytest.approx(60.0)
    assert "comm-free variant (60 ms) was slower than the real run (55.8 ms)" in s["comm_share_note"], s
