"""pytest plugin of the installed package (entry point `pytest11`): `--benchmark-json` may name a
folder that does not exist yet.

pytest-benchmark declares that option `argparse.FileType('wb')`: argparse opens the file while it
parses the command line, before any conftest is loaded, so a missing folder was a usage error (and a
CI job that wrote `out/base1.json` got no JSON). An entry-point plugin is loaded before that parse:
it wraps the option's conversion so that the parent folder is created first; the file is then opened
by pytest-benchmark's own conversion, with its own error if it still cannot be. pytest keeps the
option's keywords on its `Argument` (pytest 8 builds the argparse parser from them at each parse) and,
from pytest 9, also adds the argparse action at once: both are wrapped. Found neither, nothing
changes. This module imports nothing from pytest."""
from __future__ import annotations

import os

OPTION = "--benchmark-json"


def with_folder(open_file):
    """`open_file` (a path -> open file conversion) that first creates the path's parent folder."""
    def convert(path: str):
        if path != "-":  # FileType's stdout
            try:
                os.makedirs(os.path.dirname(os.path.abspath(os.path.expanduser(path))), exist_ok=True)
            except OSError:
                pass  # open_file says why the file cannot be opened
        return open_file(path)
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
