"""The GPU workflow (.github/workflows/gpu-bench.yml) run as written, on CPU: every `run:` block, read
from the YAML (not a copy), in order, with the shell GitHub uses, in a scratch repository holding this
tree as two commits (the merge base is the parent) and a tiny BENCH_ARGS given as the repository
variable. The `pip install` steps run as written into a throwaway venv that sees this environment's
packages (no dependencies, no index: they are installed already). The `uses:` steps are done by the
test: the checkout is the scratch repository; the upload is checked as the folder it would upload."""
import json
import os
import re
import subprocess
import sys
import time

import yaml

from tests.helpers import ROOT, copy_checkout

WORKFLOW = ROOT / ".github" / "workflows" / "gpu-bench.yml"
# A multi-word marker expression in quotes: BENCH_ARGS must be split like a command line.
TINY = ('-m "baseline and not mlc" --llm-tp-sizes 1 --llm-batch-sizes 1 --llm-prompt-len 4 '
        '--llm-max-tokens 4 --llm-num-runs 7 --llm-warmup-runs 1')
# 7 rounds a side: the gate can decide (with fewer its verdict is "cannot decide", exit 3). Three CPU
# sessions of one commit can differ beyond any GPU threshold, so the Gate step may say REGRESSED
# (exit 1) here: the test asks that it ran and decided, not what it decided.
GATE_STEP = "Gate"
# How GitHub runs a `run:` block on Linux, per `shell:` (https://docs.github.com/actions: jobs.<id>.steps[*].shell).
SHELLS = {None: ["bash", "-e"], "bash": ["bash", "--noprofile", "--norc", "-eo", "pipefail"]}
KNOWN_ACTIONS = ("actions/checkout@", "actions/upload-artifact@")


def evaluate(text: str, context: dict) -> str:
    """`${{ ... }}` in `text` replaced: operands joined by `||`, each a context path (vars.X,
    github.base_ref; unset = empty) or a '...' literal. Anything else fails, so that the test is
    taught each new kind of expression rather than passing it through."""
    def one(m):
        for operand in (o.strip() for o in m.group(1).split("||")):
            if re.fullmatch(r"'[^']*'", operand):
                value = operand[1:-1]
            elif re.fullmatch(r"[a-z]+(\.[A-Za-z_][A-Za-z0-9_]*)+", operand):
                value = context
                for part in operand.split("."):
                    value = value.get(part, "") if isinstance(value, dict) else ""
            else:
                raise AssertionError(f"expression the test cannot evaluate: {m.group(0)}")
            if value:
                return str(value)
        return ""
    return re.sub(r"\$\{\{(.*?)\}\}", one, str(text))


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


def scratch_repo(path):
    """This tree (tracked files and new ones git does not ignore, as they are on disk) committed
    twice: the merge base, then an empty PR commit; origin/main points at the base."""
    copy_checkout(path)
    git("init", "-q", "-b", "main", cwd=path)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "base", cwd=path)
    git("commit", "-q", "--allow-empty", "-m", "pr", cwd=path)
    git("update-ref", "refs/remotes/origin/main", "HEAD~1", cwd=path)


def test_the_gpu_workflow_runs_as_written(tmp_path):
    wf = yaml.safe_load(WORKFLOW.read_text())
    (job,) = wf["jobs"].values()
    shell = SHELLS[(wf.get("defaults") or {}).get("run", {}).get("shell")]
    repo = tmp_path / "repo"  # `../base` of the workflow lands beside it, in tmp_path
    repo.mkdir()
    scratch_repo(repo)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)

    context = {"vars": {"BENCH_ARGS": TINY}, "github": {"base_ref": "main"}}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "PIP_"))}
    env.update(GITHUB_WORKSPACE=str(repo), VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
               PIP_NO_DEPS="1", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",  # "0": isolation off (pip's inversion)
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_QUIET="1")
    env.update({k: evaluate(v, context) for k, v in job.get("env", {}).items()})
    assert env["BENCH_ARGS"] == TINY

    steps, outputs, took = job["steps"], {}, {}
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] == 0, \
        "the merge base needs the full history"
    for i, step in enumerate(steps):
        if "uses" in step:
            assert step["uses"].startswith(KNOWN_ACTIONS), f"teach this test the action {step['uses']}"
            continue
        name = step.get("name", f"step {i}")
        script = tmp_path / f"step{i}.sh"
        script.write_text(evaluate(step["run"], context))
        step_env = dict(env, **{k: evaluate(v, context) for k, v in step.get("env", {}).items()})
        t0 = time.monotonic()
        r = subprocess.run([*shell, str(script)], cwd=repo, env=step_env, capture_output=True, text=True,
                           timeout=600)
        took[name] = round(time.monotonic() - t0, 1)
        ok = (0, 1) if name == GATE_STEP else (0,)
        assert r.returncode in ok, f"step '{name}' exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs[name] = r.stdout
    print("seconds per step:", took)

    out = repo / "out"
    for run in ("base1", "base2", "pr"):
        data = json.loads((out / f"{run}.json").read_text())
        assert [b["name"] for b in data["benchmarks"]] == ["test_baseline[bs1]"], run
        assert data["llm_bench"]["num_runs"] == 7 and data["llm_bench"]["max_tokens"] == 4
        assert (out / run / "runs.jsonl").is_file(), f"--llm-results-dir of {run} is not under out/"
    assert (out / "compare.csv").read_text().count("test_baseline[bs1]") == 3
    assert outputs[GATE_STEP].startswith(("llm-bench gate: PASS", "llm-bench gate: REGRESSED")), outputs[GATE_STEP]
    assert "checks:" in outputs[GATE_STEP], outputs[GATE_STEP]
    assert (out / "report" / "index.md").is_file()
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert (repo / upload["with"]["path"]).is_dir()
    assert (tmp_path / "base" / "benchmarks").is_dir()  # the base worktree, where the workflow put it
