"""Helpers of the suite's own tests: run pytest in a subprocess as a user would; is a process alive;
a clean copy of the checkout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def proc_stat(pid) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead: it holds no GPU, no socket)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def copy_checkout(dest: Path) -> None:
    """This checkout's files as they are on disk (tracked, and new ones git does not ignore) copied to
    `dest`: a clean source tree, without build folders or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    for f in filter(None, listed.split("\0")):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
