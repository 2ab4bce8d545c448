"""pytest plugin of the installed package (entry point `pytest11`): `--benchmark-json` may name a
folder that does not exist yet, and a run that stores nothing leaves an existing file as it was.

pytest-benchmark declares that option `argparse.FileType('wb')`: argparse opens (and truncates) the
file while it parses the command line, before any conftest is loaded, so a missing folder was a usage
error (and a CI job that wrote `out/base1.json` got no JSON), and a usage error anywhere else on the
command line emptied the JSON of an earlier run. An entry-point plugin is loaded before that parse:
it replaces the option's conversion with one that creates the parent folder, checks that the file
can be written (without truncating it) and returns a file that is written when closed, if the run
stored a benchmark.
pytest keeps the option's keywords on its `Argument` (pytest 8 builds the argparse parser from them
at each parse) and, from pytest 9, also adds the argparse action at once: both are wrapped. Found
neither, nothing changes. This module imports nothing from pytest."""
from __future__ import annotations

import argparse
import json
import os
import sys

OPTION = "--benchmark-json"


class OpenedAtFirstWrite:
    """A binary file for writing that pytest-benchmark fills (`with f: f.write(...)`, all it offers).
    What is written is kept until close, then put in place whole (a temporary file renamed over the
    path), and only if it holds a benchmark: a run whose every benchmark failed writes a JSON of none,
    which would replace an earlier run's file with nothing to compare."""

    def __init__(self, path: str):
        self.name, self.mode, self._parts, self.closed = path, "wb", [], False

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        data = b"".join(self._parts)
        if not data:
            return
        if not holds_a_benchmark(data):
            print(f"{OPTION} {self.name}: this run stored no benchmark; the file is left as it was",
                  file=sys.stderr)
            return
        tmp = f"{self.name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return self.name

    __fspath__ = __str__


def holds_a_benchmark(data: bytes) -> bool:
    """Whether pytest-benchmark's JSON `data` lists a benchmark (anything that is not its JSON: kept)."""
    try:
        run = json.loads(data)
    except ValueError:
        return True
    return not isinstance(run, dict) or bool(run.get("benchmarks", True))


def check_appendable(path: str) -> None:
    """OSError unless `path` can be written without truncating it (appending truncates nothing); a
    file the check had to create is removed."""
    existed = os.path.lexists(path)
    with open(path, "ab"):
        pass
    if not existed:
        os.remove(path)


def with_folder(open_file):
    """A conversion for `--benchmark-json` in place of `open_file` (FileType('wb')): the parent folder
    is created, the file checked to be writable as FileType would (its message), and returned unopened
    (OpenedAtFirstWrite). `-` (stdout) is left to `open_file`."""
    def convert(path: str):
        if path == "-":
            return open_file(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(os.path.expanduser(path))), exist_ok=True)
            check_appendable(path)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"can't open '{path}': {e}") from None
        return OpenedAtFirstWrite(path)
    convert.creates_folder = True
    convert.__name__ = getattr(open_file, "__name__", type(open_file).__name__)
    return convert


def wrap(parser) -> bool:
    """Wrap `OPTION`'s conversion in pytest's `parser`; whether the option was found."""
    found = False
    for group in {id(g): g for g in [*getattr(parser, "_groups", []), getattr(parser, "_anonymous", None)]
                  if g is not None}.values():
        for arg in getattr(group, "options", []):
            if OPTION in arg.names():
                found = True
                kw = getattr(arg, "_attrs", {})
                if callable(kw.get("type")) and not getattr(kw["type"], "creates_folder", False):
                    kw["type"] = arg.type = with_folder(kw["type"])
    for action in getattr(getattr(parser, "optparser", None), "_actions", []):
        if OPTION in action.option_strings:
            found = True
            if callable(action.type) and not getattr(action.type, "creates_folder", False):
                action.type = with_folder(action.type)
    return found


class _Wrapper:
    """Registered beside this module: wraps the option once pytest-benchmark has added it, whether
    it was registered before this plugin or after (pytest calls `pytest_plugin_registered` for the
    plugins registered earlier too)."""

    def __init__(self, parser):
        self.parser, self.done = parser, False

    def pytest_plugin_registered(self):
        if not self.done:
            self.done = wrap(self.parser)


def pytest_addoption(parser, pluginmanager):
    pluginmanager.register(_Wrapper(parser), "llm-bench-json-folder")
