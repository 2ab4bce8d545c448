"""`llm-bench`: compare, gate, report and trace, over pytest-benchmark's stored JSON."""
from __future__ import annotations

import argparse
import sys

from .storage import DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llm-bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    from . import compare, gate, report, trace

    compare.add_parser(sub)
    gate.add_parser(sub)
    report.add_parser(sub)
    trace.add_parser(sub)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except DataError as e:  # every subcommand: bad input is exit 2 with the cause, never a traceback
        print(f"llm-bench {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
