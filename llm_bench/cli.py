"""`llm-bench`: compare, gate, report and trace, over pytest-benchmark's stored JSON and the live
results file (results/runs.jsonl). Exit status 2 with one line on stderr for every input error."""
from __future__ import annotations

import os
import sys

from . import __version__
from .options import OneLineParser as Parser
from .storage import DataError


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="llm-bench", description=__doc__)
    ap.add_argument("--version", action="version", version=f"llm-bench {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    from . import compare, gate, report, trace

    compare.add_parser(sub)
    gate.add_parser(sub)
    report.add_parser(sub)
    trace.add_parser(sub)
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # --help, --version, a usage error: argparse has printed what it had to say
        return e.code if isinstance(e.code, int) else 2
    try:
        return a.func(a)
    except DataError as e:  # every subcommand: bad input is exit 2 with the cause, never a traceback
        print(f"llm-bench {a.cmd}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-bench {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llm-bench compare ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
