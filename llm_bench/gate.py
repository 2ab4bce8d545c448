"""`llm-bench gate`: fail CI only on real regressions. A metric regresses when it is worse than its
threshold AND the per-round samples differ significantly (one-sided Mann-Whitney U, scipy; alpha
0.002 as asv uses). Exit codes: 0 pass, 1 regression, 2 usage or data error.

Rounds within one session vary less than sessions do (on H200 an A/A pair of sessions moved TTFT by
9.5% with p=1e-4 while TPOT moved 0.1%), so one baseline run makes the test overconfident. Give
several baseline runs (`--baseline A B ...`): their samples are pooled and the spread between their
values raises the threshold to the noise actually seen between sessions."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

from .storage import DataError, fingerprint, load_runs


@dataclass
class Rule:
    metric: str          # extra_info column
    threshold: float     # relative (0.05 = 5%) or absolute when `absolute`
    higher_is_worse: bool
    samples: str | None  # per-round list used for the significance test
    absolute: bool = False


DEFAULT_RULES = [
    Rule("tpot_ms_p50", 0.05, True, "tpot_ms_rounds"),
    Rule("ttft_ms_p50", 0.05, True, "ttft_ms_rounds"),
    Rule("tok_per_s", 0.05, False, "tok_per_s_rounds"),
    # Efficiency is a ratio of two benchmarks: significance is that of this benchmark's TPOT.
    Rule("scaling_efficiency", 0.03, False, "tpot_ms_rounds", absolute=True),
]
KNOWN = {r.metric: r for r in DEFAULT_RULES}


def parse_rule(text: str) -> Rule:
    """NAME:THRESHOLD, e.g. tpot_ms_p50:5% or scaling_efficiency:0.03 (absolute)."""
    name, _, thr = text.partition(":")
    usage = f"--metric {text!r}: expected NAME:THRESHOLD (e.g. tpot_ms_p50:5%)"
    if not thr:
        raise DataError(usage)
    base = KNOWN.get(name, Rule(name, 0, not name.startswith("tok_per_s"), f"{name.rsplit('_p', 1)[0]}_rounds"))
    try:
        value = float(thr.removesuffix("%"))
    except ValueError:
        raise DataError(usage) from None
    if thr.endswith("%"):
        return Rule(name, value / 100, base.higher_is_worse, base.samples)
    return Rule(name, value, base.higher_is_worse, base.samples, absolute=True)


def check(bases: list[dict], cand: dict, rules: list[Rule], alpha: float) -> tuple[list[dict], list[str]]:
    """Rows of what was checked (and why it failed); names missing on either side."""
    b_all = [{b["fullname"]: b for b in run["benchmarks"]} for run in bases]
    b_names = set().union(*b_all)
    c_by = {b["fullname"]: b for b in cand["benchmarks"]}
    missing = [f"only in baseline: {n}" for n in sorted(b_names - set(c_by))]
    missing += [f"only in candidate: {n}" for n in sorted(set(c_by) - b_names)]
    rows = []
    for name in sorted(b_names & set(c_by)):
        bes = [run[name].get("extra_info") or {} for run in b_all if name in run]
        ce = c_by[name].get("extra_info") or {}
        for r in rules:
            vals = [float(be[r.metric]) for be in bes if r.metric in be]
            if not vals or r.metric not in ce:
                continue
            bv, cv = float(np.median(vals)), float(ce[r.metric])
            rel = lambda x: x if r.absolute else (x / bv if bv else float("inf"))  # noqa: E731
            delta = rel(cv - bv)
            noise = rel(max(vals) - min(vals)) if len(vals) > 1 else 0.0
            thr = max(r.threshold, noise)
            # At the threshold counts as worse: a 5% slowdown fails a 5% threshold (1e-9: float noise).
            worse = delta >= thr - 1e-9 if r.higher_is_worse else delta <= -thr + 1e-9
            bs = [x for be in bes for x in (be.get(r.samples) or [])]
            cs = ce.get(r.samples) or []
            p = None
            if len(bs) >= 2 and len(cs) >= 2:
                # The samples' direction: for efficiency the samples are TPOT (higher = worse).
                samples_higher_worse = r.higher_is_worse or r.samples.startswith("tpot")
                alt = "greater" if samples_higher_worse else "less"
                p = float(mannwhitneyu(cs, bs, alternative=alt).pvalue)
            significant = p is not None and p < alpha
            why = f"threshold raised to the baselines' spread {noise:.3g}" if noise > r.threshold else ""
            if worse and not significant:
                why = ("no per-round samples" if p is None else
                       f"not significant (p={p:.3g} >= {alpha}; min reachable p with n={len(bs)},{len(cs)} "
                       f"is {_min_p(len(bs), len(cs)):.3g})")
            rows.append({"benchmark": name, "metric": r.metric, "baseline": bv, "candidate": cv,
                         "change": delta, "absolute": r.absolute, "threshold": thr, "p": p,
                         "regressed": bool(worse and significant), "note": why})
    return rows, missing


def _min_p(n1: int, n2: int) -> float:
    from math import comb

    return 1 / comb(n1 + n2, n1)


def add_parser(sub) -> None:
    p = sub.add_parser("gate", help="exit 1 on a significant regression vs a baseline run")
    p.add_argument("--baseline", required=True, nargs="+",
                   help="run id(s) (0001), file(s); several runs of the base commit set the noise floor")
    p.add_argument("--candidate", default=None, help="default: the latest stored run")
    p.add_argument("--metric", action="append", default=[], metavar="NAME:THRESHOLD",
                   help="e.g. tpot_ms_p50:5%% (relative) or scaling_efficiency:0.03 (absolute); "
                        "default: tpot/ttft p50 +5%%, tok_per_s -5%%, scaling_efficiency -0.03")
    p.add_argument("--alpha", type=float, default=0.002)
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--allow-different-machines", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    rules = [parse_rule(m) for m in a.metric] or DEFAULT_RULES
    base = load_runs(a.baseline, a.storage)
    cand = load_runs([a.candidate] if a.candidate else [], a.storage)[0]
    return gate(base, cand, rules, a.alpha, a.allow_different_machines)


def gate(base, cand: dict, rules: list[Rule], alpha: float = 0.002, allow_different: bool = False,
         out=None) -> int:
    """Print what was checked; 0 pass, 1 regression, 2 data error. `base`: one run or a list of runs."""
    out = out or sys.stdout
    bases = base if isinstance(base, list) else [base]
    fc = fingerprint(cand)
    odd = [b for b in bases if fingerprint(b) != fc]
    if odd:
        fb = fingerprint(odd[0])
        msg = f"GPU fingerprints differ: baseline {fb} ({odd[0]['_path']}) vs candidate {fc} ({cand['_path']})"
        if not allow_different:
            print(f"llm-bench gate: {msg}; numbers from different machines are not comparable "
                  f"(--allow-different-machines to compare anyway)", file=sys.stderr)
            return 2
        print(f"warning: {msg}", file=out)
    rows, missing = check(bases, cand, rules, alpha)
    print(f"baseline:  {', '.join(b['_path'] for b in bases)}\ncandidate: {cand['_path']}\nalpha={alpha}", file=out)
    for r in rows:
        ch = f"{r['change']:+.3f}" if r["absolute"] else f"{r['change']:+.1%}"
        thr = f"{r['threshold']:.3f}" if r["absolute"] else f"{r['threshold']:.0%}"
        p = "-" if r["p"] is None else f"{r['p']:.2g}"
        status = "REGRESSED" if r["regressed"] else "ok"
        print(f"{status:9} {r['benchmark']}  {r['metric']}: {r['baseline']:.4g} -> {r['candidate']:.4g} "
              f"({ch}, threshold {thr}, p={p}) {r['note']}", file=out)
    for m in missing:
        print(f"MISSING   {m}", file=out)
    if not rows:
        print("llm-bench gate: no metric was comparable between the two runs", file=sys.stderr)
        return 2
    bad = [r for r in rows if r["regressed"]]
    print(f"{len(rows)} checks, {len(bad)} regressions, {len(missing)} benchmarks missing on one side", file=out)
    return 1 if bad else 0
