"""`llm-bench`: compare, gate, report and trace, over pytest-benchmark's stored JSON."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llm-bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    from . import compare, gate, report, trace

    compare.add_parser(sub)
    gate.add_parser(sub)
    report.add_parser(sub)
    trace.add_parser(sub)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
