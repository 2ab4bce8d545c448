"""What an install puts in site-packages and what still runs from the checkout.

The wheel holds `llm_bench` only (an environment with PyPI's `fixtures`, used by testtools-style
suites, lost it to ours before), with its license and metadata and the pytest entry point that lets
`--benchmark-json` write into a new folder. `fixtures` and `overlap` run from the checkout: pytest
through pytest.ini's `pythonpath`, `python -m overlap.generate` from the repository root, and the
engine's rank processes through the PYTHONPATH EngineProcesses gives them."""
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT, copy_checkout, run_pytest

PYPI_FIXTURES = "fixtures==4.3.2"


def _pip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    copy_checkout(src)  # setuptools builds in the source tree: a build/ left there would go into the wheel
    r = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", src, "-w", out, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("parallel_llm_bench-*.whl")
    return whl


def test_the_wheel_holds_llm_bench_its_license_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"llm_bench", info}
    assert f"{info}/licenses/LICENSE" in names
    head = meta.split("\n\n", 1)[0].splitlines()
    for line in ("License-Expression: MIT", "Author: parallel-llm-bench maintainers", "Framework :: Pytest",
                 "Description-Content-Type: text/markdown"):
        assert any(line in h for h in head), line
    assert "# parallel-llm-bench" in meta  # the README is the long description
    assert "llm-bench = llm_bench.cli:main" in entry_points
    assert "llm_bench.pytest_entry = llm_bench.pytest_entry" in entry_points


def test_the_wheel_installs_beside_pypi_fixtures(wheel, tmp_path):
    dl = _pip("download", "--no-deps", "-q", PYPI_FIXTURES, "-d", tmp_path / "dl")
    if dl.returncode != 0:
        pytest.skip(f"could not download PyPI's {PYPI_FIXTURES}: {dl.stderr.strip().splitlines()[-1:]}")
    (theirs,) = (tmp_path / "dl").glob("fixtures-*.whl")
    venv = tmp_path / "venv"  # clean: none of this environment's packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    for whl in (theirs, wheel):  # theirs first, as in the environment that broke
        r = _pip("--python", py, "install", "--no-deps", "--no-index", "-q", whl)
        assert r.returncode == 0, r.stderr[-3000:]
    check = ("import importlib.metadata as m, fixtures, llm_bench.options, llm_bench.pytest_entry\n"
             "assert isinstance(fixtures.Fixture, type), fixtures.__file__\n"
             "eps = [e for e in m.entry_points(group='pytest11') if e.value == 'llm_bench.pytest_entry']\n"
             "assert eps and eps[0].load() is llm_bench.pytest_entry, eps\n"
             "print(fixtures.__file__)\n")
    r = subprocess.run([py, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(venv))
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "overlap").exists()


BENCH = "def test_sum(benchmark):\n    benchmark(sum, [1, 2])\n"


@pytest.mark.parametrize("order", [["-p", "llm_bench.pytest_entry", "-p", "benchmark"],
                                   ["-p", "benchmark", "-p", "llm_bench.pytest_entry"]],
                         ids=["ours-first", "pytest-benchmark-first"])
def test_benchmark_json_may_name_a_new_folder(tmp_path, order):
    (tmp_path / "test_sum.py").write_text(BENCH)
    target = tmp_path / "new" / "folder" / "run.json"
    r = run_pytest("test_sum.py", *order, f"--benchmark-json={target}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"benchmarks"' in target.read_text()


@pytest.mark.parametrize("args", [["test_sum.py", "--no-such-flag"], ["test_sum.py", "-k", "no_such_test"],
                                  [ROOT / "benchmarks", "--llm-model", "tinyy"]],
                         ids=["argparse-usage-error", "nothing-ran", "llm-usage-error"])
def test_a_run_that_stores_nothing_leaves_an_existing_json_as_it_was(tmp_path, args):
    """argparse's FileType('wb') truncated the file while parsing: a typo elsewhere on the command
    line emptied an earlier run's JSON."""
    (tmp_path / "test_sum.py").write_text(BENCH)
    keep = tmp_path / "keep.json"
    keep.write_text('{"benchmarks": ["an earlier run"]}')
    r = run_pytest(*args, f"--benchmark-json={keep}", cwd=tmp_path)
    assert r.returncode in (4, 5), r.stdout[-2000:] + r.stderr[-2000:]
    assert keep.read_text() == '{"benchmarks": ["an earlier run"]}'
    new = tmp_path / "new" / "never.json"
    r = run_pytest(*args, f"--benchmark-json={new}", cwd=tmp_path)
    assert r.returncode in (4, 5) and not new.exists() and new.parent.is_dir()


def test_a_json_of_no_benchmark_leaves_an_existing_file_as_it_was(tmp_path, capsys):
    """A session whose every benchmark failed: pytest-benchmark writes a JSON listing none, which
    replaced an earlier run's file. One that lists a benchmark is put in place whole."""
    from llm_bench.pytest_entry import OpenedAtFirstWrite

    keep = tmp_path / "keep.json"
    keep.write_text('{"benchmarks": ["an earlier run"]}')
    with OpenedAtFirstWrite(str(keep)) as f:
        f.write(b'{"machine_info": {}, "benchmarks": []}')
    assert keep.read_text() == '{"benchmarks": ["an earlier run"]}'
    assert "this run stored no benchmark; the file is left as it was" in capsys.readouterr().err
    with OpenedAtFirstWrite(str(keep)) as f:
        f.write(b'{"benchmarks": [')
        f.write(b'{"name": "new"}]}')
    assert keep.read_text() == '{"benchmarks": [{"name": "new"}]}' and os.listdir(tmp_path) == ["keep.json"]


def test_a_json_path_that_cannot_be_written_is_refused_while_parsing(tmp_path):
    (tmp_path / "test_sum.py").write_text(BENCH)
    (tmp_path / "taken").mkdir()
    r = run_pytest("test_sum.py", f"--benchmark-json={tmp_path / 'taken'}", cwd=tmp_path)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert (f"error: argument --benchmark-json: can't open '{tmp_path / 'taken'}': [Errno 21] Is a directory"
            in r.stderr), r.stderr[-2000:]
    assert "passed" not in r.stdout


def test_without_the_entry_point_pytest_benchmark_refuses_a_new_folder(tmp_path):
    """What the entry point is for: if pytest-benchmark stops opening the file while parsing, this
    fails and the entry point can go."""
    (tmp_path / "test_sum.py").write_text(BENCH)
    target = tmp_path / "new" / "run.json"
    r = run_pytest("test_sum.py", "-p", "no:llm_bench.pytest_entry", f"--benchmark-json={target}", cwd=tmp_path)
    assert r.returncode == 4 and "can't open" in r.stderr, r.stderr[-2000:]


def _decoy(tmp_path):
    """A folder with an `overlap` and a `fixtures` that fail on import, for PYTHONPATH: any process
    that does not find the checkout's first fails."""
    decoy = tmp_path / "decoy"
    for name in ("overlap", "fixtures"):
        (decoy / name).mkdir(parents=True)
        (decoy / name / "__init__.py").write_text(f"raise ImportError('{name} imported from outside the checkout')\n")
    return decoy


def test_generate_runs_from_the_checkout(tmp_path):
    """The README's `python -m overlap.generate`, from the repository root, at TP=2."""
    r = subprocess.run([sys.executable, "-m", "overlap.generate", "--model", "tiny", "--tp", "2", "--device", "cpu",
                        "--prompt-len", "4", "--max-tokens", "3", "--engine-timeout", "120"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(_decoy(tmp_path))))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert '"tp": 2' in r.stdout


def test_benchmarks_run_from_another_folder(tmp_path):
    """`pytest <checkout>/benchmarks` from elsewhere at TP=2: pytest finds the checkout through
    pytest.ini's `pythonpath`, the rank processes (started in this folder) through the PYTHONPATH
    EngineProcesses gives them."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", ROOT / "benchmarks", "-q",
                        "-k", "test_tensor_parallel", "--llm-tp-sizes", "2", "--llm-batch-sizes", "1",
                        "--llm-prompt-len", "4", "--llm-max-tokens", "3", "--llm-num-runs", "1",
                        "--llm-warmup-runs", "0", "--llm-results-dir", tmp_path / "res"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(_decoy(tmp_path))))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_run_from_another_folder(tmp_path, script):
    """`python scripts/X.py` puts scripts/ on the path, not the checkout: each script adds it."""
    r = subprocess.run([sys.executable, ROOT / "scripts" / script, "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(_decoy(tmp_path))))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
