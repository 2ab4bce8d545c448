"""The harness end to end on CPU: stored JSON (idempotent derived columns, both save paths),
pytest-benchmark's own compare on our files, skip reasons, and the live results file surviving a
test that crashes its engine."""
import json
import os
import subprocess
import sys

from llm_bench.storage import read_records
from tests.helpers import ROOT, run_pytest

SMALL = ["--llm-prompt-len", "4", "--llm-max-tokens", "4", "--llm-num-runs", "2", "--llm-warmup-runs", "0"]


def test_our_fixtures_package_wins_over_pypi_fixtures():
    import fixtures

    assert os.path.dirname(fixtures.__file__) == str(ROOT / "fixtures")


def test_save_and_json_together_and_pytest_benchmark_compare(tmp_path):
    storage = tmp_path / "store"
    args = [ROOT / "benchmarks", "-k", "test_tensor_parallel", "--llm-batch-sizes", "1", *SMALL,
            f"--benchmark-storage=file://{storage}", "--benchmark-autosave", "--llm-results-dir", tmp_path / "res"]
    r1 = run_pytest(*args, f"--benchmark-json={tmp_path / 'a.json'}")
    assert r1.returncode == 0, r1.stdout[-3000:]
    r2 = run_pytest(*args)
    assert r2.returncode == 0, r2.stdout[-3000:]
    saved = sorted(storage.glob("*/*.json"))
    assert len(saved) == 2
    a = json.loads((tmp_path / "a.json").read_text())
    s = json.loads(saved[0].read_text())
    ea = {b["name"]: b["extra_info"] for b in a["benchmarks"]}
    es = {b["name"]: b["extra_info"] for b in s["benchmarks"]}
    assert ea == es  # the same derived columns whichever hook call wrote them
    tp2 = ea["test_tensor_parallel[tp2-bs1]"]
    assert tp2["scaling_base_tp"] == 1 and 0 < tp2["scaling_efficiency"] < 2
    for k in ("ttft_ms_p50", "itl_ms_p99", "tpot_ms_mean", "e2e_ms_mean", "tok_per_s"):
        assert isinstance(tp2[k], float)
    assert len(tp2["tpot_ms_rounds"]) == 2
    assert "gpu" in s["machine_info"] and "hz_actual" not in s["machine_info"].get("cpu", {})
    assert "parallel-llm-bench" in r1.stdout and "TTFT ms" in r1.stdout
    cli = "import sys; from pytest_benchmark.cli import main; sys.argv[0] = 'pytest-benchmark'; main()"
    cmp = subprocess.run([sys.executable, "-c", cli, "--storage", f"file://{storage}", "compare", "0001", "0002"],
                         cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert cmp.returncode == 0, cmp.stderr
    assert "test_tensor_parallel[tp2-bs1]" in cmp.stdout


def test_skips_say_why(tmp_path):
    r = run_pytest(ROOT / "benchmarks", "-k", "test_tensor_parallel", "--llm-tp-sizes", "3", "--llm-batch-sizes", "1",
                   *SMALL, "-rs", "--llm-results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "TP=3 does not divide num_key_value_heads=4" in r.stdout
    # Asking for CUDA where no GPU is visible is refused before anything runs, not a session of skips.
    r = run_pytest(ROOT / "benchmarks", "-k", "test_baseline", "--llm-device", "cuda", "--llm-tp-sizes", "1",
                   "--llm-batch-sizes", "1", *SMALL, "-rs", "--llm-results-dir", tmp_path)
    assert r.returncode == 4 and "--llm-device cuda: no CUDA GPU is visible here" in r.stderr, r.stderr[-2000:]
    assert "passed" not in r.stdout and "skipped" not in r.stdout


def test_pipeline_at_batch_1_skips_with_reason(tmp_path):
    r = run_pytest(ROOT / "benchmarks", "-k", "pipeline", "--llm-batch-sizes", "1", *SMALL, "-rs",
                   "--llm-pipeline-min-tokens", "1000", "--llm-results-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "pipeline does not apply at batch 1 x 4 prompt tokens" in r.stdout


CRASHING = '''
import pytest
from fixtures.measure import run_generation


def test_a_first(benchmark, llm_bench):
    run_generation(benchmark, llm_bench, llm_bench.key(2), 1, "t")


def test_b_crash(benchmark, llm_bench):
    eng = llm_bench.pool.get(llm_bench.key(2))
    eng.crash_rank(1)  # SIGKILL rank 1, as a segfault would


def test_c_after(benchmark, llm_bench):
    run_generation(benchmark, llm_bench, llm_bench.key(2), 1, "t")
'''


def test_results_survive_a_crashing_engine(tmp_path):
    (tmp_path / "test_crashing.py").write_text(CRASHING)
    (tmp_path / "conftest.py").write_text("pytest_plugins = ('fixtures.plugin',)\n")
    res = tmp_path / "res"
    r = run_pytest(tmp_path / "test_crashing.py", *SMALL, "--llm-results-dir", res,
                   f"--benchmark-json={tmp_path / 'out.json'}", cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "rank 1" in r.stdout and "SIGKILL" in r.stdout
    names = [x["name"] for x in read_records(str(res / "runs.jsonl"))]
    assert names == ["test_a_first", "test_c_after"]  # the engine was rebuilt for the test after the crash
    saved = json.loads((tmp_path / "out.json").read_text())
    assert sorted(b["name"] for b in saved["benchmarks"]) == ["test_a_first", "test_c_after"]


def test_every_llm_flag_the_docs_and_scripts_spell_exists():
    """A `--llm-*` flag written in the README, NOTES or a script must be one pytest knows
    (`--llm-no-compile` once was not: argparse's own pair would have been `--no-llm-compile`)."""
    import re

    helptext = run_pytest("--help").stdout
    known = set(re.findall(r"--llm-[a-z0-9-]+", helptext))
    places = [ROOT / "README.md", ROOT / "NOTES-gpu.md", ROOT / ".ci" / "run",
              ROOT / ".github" / "workflows" / "gpu-bench.yml", *sorted((ROOT / "scripts").glob("*.sh"))]
    spelled = {(p.name, f) for p in places for f in re.findall(r"--llm-(?:\[no-\])?[a-z0-9-]+", p.read_text())}
    unknown = sorted((name, f) for name, f in spelled if f.replace("[no-]", "") not in known
                     or ("[no-]" in f and f.replace("[no-]", "no-") not in known))
    assert not unknown, unknown
