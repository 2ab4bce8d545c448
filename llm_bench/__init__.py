"""Analysis that also runs outside pytest: compare stored runs, gate regressions, draw reports."""
from importlib.metadata import PackageNotFoundError, version

try:  # the version is written once, in pyproject.toml; an installed package carries it
    __version__ = version("parallel-llm-bench")
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "unknown (not installed: pip install -e .)"
