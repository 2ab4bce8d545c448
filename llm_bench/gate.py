"""`llm-bench gate`: fail CI only on real regressions, and never pass when it could not have failed.

A metric regresses when it is worse than its threshold AND the per-round samples differ
significantly (one-sided Mann-Whitney U, scipy; alpha 0.002 as asv uses). The first line is the
verdict. Exit status:
  0  pass: every gated benchmark was decidable and none regressed;
  1  regression (a candidate that lost a gated value the baseline has counts as one; a value that
     cannot be true, a NaN or a time not above 0, is refused when a file is read: 2);
  2  usage or data error (unknown metric, a threshold that could never be crossed, bad alpha,
     unreadable run, a string where a number belongs, an interrupted benchmark, different GPUs), and
     a benchmark the baseline has a gated metric for that the candidate lacks (interrupted, listed in
     its `llm_bench_dropped`, or not run): what was not measured cannot pass;
  3  cannot decide: too few rounds for any p below alpha (3 rounds a side: p >= 0.05), or no
     per-round samples. A gate that cannot fail must not look like a pass, and it is not a usage
     error either: the inputs are sound, the evidence is too thin (run more rounds, or raise alpha).
A regression outranks an error, an error outranks "cannot decide". Benchmarks only in the candidate,
and those no gated metric applies to, are listed.

Rounds within one session vary less than sessions do (NOTES-gpu.md: an A/A pair of GPU sessions
that differed significantly), so one baseline run makes the test overconfident. Give
several baseline runs (`--baseline A B ...`): their samples are pooled and the spread between their
values raises the threshold to the noise actually seen between sessions."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import reprlib
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.stats import mannwhitneyu

from .metrics import positive
from .storage import DataError, fingerprint, json_safe, load_runs, write_output

PASS, REGRESSED, ERROR, UNDECIDED = 0, 1, 2, 3
VERDICT = {PASS: "PASS", REGRESSED: "REGRESSED", ERROR: "ERROR", UNDECIDED: "CANNOT DECIDE"}


@dataclass
class Rule:
    metric: str          # extra_info column
    threshold: float     # relative (0.05 = 5%) or absolute when `absolute`
    higher_is_worse: bool
    samples: str         # per-round list used for the significance test
    absolute: bool = False
    top: float | None = None  # about the largest value the metric takes (efficiency: 1 = ideal), if bounded


DEFAULT_RULES = [
    Rule("tpot_ms_p50", 0.05, True, "tpot_ms_rounds"),
    Rule("ttft_ms_p50", 0.05, True, "ttft_ms_rounds"),
    Rule("tok_per_s", 0.05, False, "tok_per_s_rounds"),
    # Efficiency is a ratio of two benchmarks: its per-round samples are this benchmark's TPOT rounds
    # through the stored efficiency (`_samples`), so a faster TP=1 base lowers them as it lowers it.
    Rule("scaling_efficiency", 0.03, False, "tpot_ms_rounds", absolute=True, top=1.0),
]
# Gated only when asked (--metric allreduce_us_p50:10%): the all-reduce benchmarks' per-op latency.
KNOWN = {r.metric: r for r in DEFAULT_RULES + [Rule("allreduce_us_p50", 0.05, True, "allreduce_us_rounds")]}


def parse_rule(text: str) -> Rule:
    """NAME:THRESHOLD, e.g. tpot_ms_p50:5% (relative) or scaling_efficiency:0.03 (absolute). The name is
    one the gate knows per-round samples for; the threshold is finite and positive, and a drop the
    threshold asks for can happen: below 100% relative on a higher-is-better metric, and below the
    metric's top absolute (scaling efficiency cannot fall by 1: it is about 1 at best)."""
    name, _, thr = text.partition(":")
    if name not in KNOWN:
        raise DataError(f"--metric {text!r}: unknown metric '{name}'; known: {', '.join(KNOWN)}")
    if not thr:
        raise DataError(f"--metric {text!r}: expected NAME:THRESHOLD (e.g. {name}:5%)")
    try:
        value = float(thr.removesuffix("%"))
    except ValueError:
        raise DataError(f"--metric {text!r}: threshold '{thr}' is not a number (e.g. {name}:5%)") from None
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"--metric {text!r}: the threshold must be a finite number above 0")
    base = KNOWN[name]
    if thr.endswith("%"):
        if value >= 100 and not base.higher_is_worse:
            raise DataError(f"--metric {text!r}: {name} cannot fall by {value:g}% or more: the gate could never fail")
        return Rule(name, value / 100, base.higher_is_worse, base.samples)
    if base.top is not None and value >= base.top and not base.higher_is_worse:
        raise DataError(f"--metric {text!r}: {name} is at most about {base.top:g}, so it cannot fall by {value:g}: "
                        f"the gate could never fail (e.g. {name}:0.03, or {name}:5% relative)")
    return Rule(name, value, base.higher_is_worse, base.samples, absolute=True, top=base.top)


def parse_rules(texts: list[str], only: bool = False) -> list[Rule]:
    """The rules to gate: the defaults with each `--metric` replacing the default of its name or
    adding one (so adding a metric never stops the defaults from being gated); with `only`, just the
    `--metric` rules."""
    rules = [parse_rule(t) for t in texts]
    names = [r.metric for r in rules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--metric given twice for {', '.join(twice)}")
    if only:
        if not rules:
            raise DataError("--only-metrics needs at least one --metric")
        return rules
    given = {r.metric: r for r in rules}
    return [given.pop(r.metric, r) for r in DEFAULT_RULES] + list(given.values())


def check_alpha(alpha: float) -> float:
    if not (0 < alpha < 1):  # False for NaN too
        raise DataError(f"--alpha {alpha}: must be between 0 and 1 (exclusive); the default is 0.002")
    return alpha


@lru_cache(maxsize=None)
def _min_p(n1: int, n2: int) -> float:
    """The smallest one-sided p the test can return for n1 and n2 rounds: that of fully separated
    samples, through the same scipy call, so the bound is the one scipy's method reaches (exact for
    small samples; for 10 rounds a side the normal approximation's 9.1e-5, not 1/C(20, 10) = 5.4e-6)."""
    return float(mannwhitneyu(np.arange(n1) + n2, np.arange(n2), alternative="greater").pvalue)


def _samples(r: Rule, e: dict) -> list[float]:
    """Per-round values of `r.metric` in extra_info `e` (its rounds checked by `_check_one`). Scaling
    efficiency is TPOT(base) / TPOT x base TP / TP, so round i's is efficiency x TPOT p50 / TPOT_i: this
    benchmark's spread around the stored efficiency, moved by the base as the efficiency is (the base's
    own spread is left out)."""
    rounds = e.get(r.samples) or []
    if r.metric != "scaling_efficiency":
        return list(rounds)
    eff, tpot = e.get("scaling_efficiency"), e.get("tpot_ms_p50")
    if not (positive(eff) and positive(tpot)):
        return []
    return [eff * tpot / x for x in rounds]


def _fmt(v: float, absolute: bool) -> str:
    return f"{v:+.3f}" if absolute else f"{v:+.1%}"


def _row(**kw) -> dict:
    return {"metric": "-", "absolute": False, "baseline": None, "candidate": None, "change": None, "threshold": None,
            "p": None, "min_p": None, "n_baseline": 0, "n_candidate": 0, **kw}


def _check_one(r: Rule, bes: list[dict], ce: dict, alpha: float) -> dict | None:
    """One metric of one benchmark; None when no baseline run has it (older files lack columns). Every
    gated metric is a time, a rate or an efficiency: a value that is not a finite number above 0 is
    no measurement (an error in the baseline, a regression in the candidate)."""
    have = [be for be in bes if r.metric in be]
    if not have:
        return None
    row = _row(metric=r.metric, absolute=r.absolute, threshold=r.threshold)

    def done(status: str, note: str) -> dict:
        return {**row, "status": status, "note": note}

    bad = [v for v in (be[r.metric] for be in have) if not positive(v)]
    if bad:
        return done("ERROR", f"the baseline value is {reprlib.repr(bad[0])}, not a finite number above 0: "
                             "nothing to compare against")
    vals = [float(be[r.metric]) for be in have]
    bv = float(np.median(vals))
    row["baseline"] = bv
    cv = ce.get(r.metric)
    if not positive(cv):
        return done("REGRESSED", "the candidate has no value" if cv is None else
                    f"the candidate value is {reprlib.repr(cv)}, not a finite number above 0")
    cv = float(cv)
    row["candidate"] = cv
    if r.metric == "scaling_efficiency" and {be.get("scaling_base_tp") for be in have} != {ce.get("scaling_base_tp")}:
        return done("ERROR", f"efficiency against different base TP sizes (baseline "
                             f"{sorted({str(be.get('scaling_base_tp')) for be in have})}, candidate "
                             f"{ce.get('scaling_base_tp')}): not comparable")
    for side, es in (("baseline", bes), ("candidate", [ce])):
        for e in es:
            rounds = e.get(r.samples)
            if rounds is not None and not (isinstance(rounds, list) and all(positive(x) for x in rounds)):
                return done("ERROR", f"'{r.samples}' in the {side} is {reprlib.repr(rounds)}: not all finite "
                                     "numbers above 0")
    rel = (lambda x: x) if r.absolute else (lambda x: x / bv)
    delta = rel(cv - bv)
    noise = rel(max(vals) - min(vals)) if len(vals) > 1 else 0.0
    thr = max(r.threshold, noise)
    row.update(change=delta, threshold=thr)
    lowest = bv - thr if r.absolute else bv * (1 - thr)  # a higher-is-better candidate must fall to this
    if not r.higher_is_worse and lowest <= 0:
        return done("ERROR", f"to fail, {r.metric} would have to fall to {lowest:.4g} or below, and it cannot "
                             f"fall to 0 (threshold {_fmt(thr, r.absolute)} on {bv:.4g}): this check could never fail")
    # At the threshold counts as worse: a 5% slowdown fails a 5% threshold (1e-9: float noise).
    worse = delta >= thr - 1e-9 if r.higher_is_worse else delta <= -thr + 1e-9
    bs = [x for be in bes for x in _samples(r, be)]
    cs = _samples(r, ce)
    row.update(n_baseline=len(bs), n_candidate=len(cs))
    if not bs or not cs:
        side = "baseline" if not bs else "candidate"
        return done("UNDECIDED", f"cannot decide: no per-round samples ('{r.samples}') in the {side}")
    alt = "greater" if r.higher_is_worse else "less"
    row["min_p"] = floor = _min_p(len(cs), len(bs))
    if floor >= alpha:
        return done("UNDECIDED", f"cannot decide: with {len(bs)} baseline and {len(cs)} candidate rounds the "
                                 f"smallest reachable p is {floor:.2g} >= alpha {alpha}")
    p = float(mannwhitneyu(cs, bs, alternative=alt).pvalue)
    row["p"] = p
    if worse and p < alpha:
        return done("REGRESSED", "")
    if worse:
        return done("ok", f"worse by the threshold but not significant (p={p:.3g} >= alpha {alpha}, smallest "
                          f"reachable p {floor:.2g})")
    raised = noise > r.threshold
    return done("ok", f"threshold raised to the baselines' spread {_fmt(noise, r.absolute)}" if raised else "")


def check(bases: list[dict], cand: dict, rules: list[Rule], alpha: float) -> tuple[list[dict], list[str], list[str]]:
    """Rows of what was checked, each with a status (ok, REGRESSED, UNDECIDED, ERROR) and why; names
    on one side only that no row stands for; benchmarks in common that no rule applies to. A baseline
    benchmark with a gated metric that the candidate lacks is an ERROR row: it was not measured."""
    b_all = [{b["fullname"]: b for b in run["benchmarks"]} for run in bases]
    b_names = set().union(*b_all)
    c_by = {b["fullname"]: b for b in cand["benchmarks"]}
    dropped = set(cand.get("llm_bench_dropped") or [])  # names the plugin did not store: interrupted
    gated = {r.metric for r in rules}
    rows, missing, not_gated = [], [], []
    for name in sorted(b_names & set(c_by)):
        bes = [run[name]["extra_info"] for run in b_all if name in run]
        ce = c_by[name]["extra_info"]
        empty = [bases[i]["_path"] for i, run in enumerate(b_all) if name in run and not run[name]["extra_info"]]
        empty += [cand["_path"]] if not ce else []
        if empty:  # pytest-benchmark stores an interrupted benchmark's rounds with nothing of ours
            rows.append(_row(benchmark=name, status="ERROR",
                             note=f"no measurements in {', '.join(empty)} (empty extra_info: interrupted before it "
                                  "finished?): refused"))
            continue
        checked = [row for r in rules if (row := _check_one(r, bes, ce, alpha)) is not None]
        if not checked:
            not_gated.append(name)
        rows += [{"benchmark": name, **row} for row in checked]
    for name in sorted(b_names - set(c_by)):
        why = ("interrupted in the candidate run (listed in its llm_bench_dropped): not stored"
               if name.split("::")[-1] in dropped else "not in the candidate run (not selected, skipped or failed?)")
        if any(gated & set(run[name]["extra_info"]) for run in b_all if name in run):
            rows.append(_row(benchmark=name, status="ERROR",
                             note=f"{why}; the baseline gates it, and what was not measured cannot pass"))
        else:
            missing.append(f"only in baseline: {name} ({why})")
    missing += [f"only in candidate: {n}" for n in sorted(set(c_by) - b_names)]
    return rows, missing, not_gated


def add_parser(sub) -> None:
    p = sub.add_parser("gate", help="exit 1 on a significant regression vs baseline runs (3: cannot decide)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, nargs="+",
                   help="run id(s) (0001), file(s); several runs of the base commit set the noise floor")
    p.add_argument("--candidate", default=None,
                   help="one run (file, id, runs.jsonl#SESSION); default: the latest stored run. It must hold "
                        "every benchmark the baseline has a gated metric for: one missing is an error (exit 2)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME:THRESHOLD",
                   help="e.g. tpot_ms_p50:5%% (relative) or scaling_efficiency:0.03 (absolute); known: "
                        f"{', '.join(KNOWN)}. Replaces the default of its name or adds a metric to the defaults "
                        "(tpot/ttft p50 +5%%, tok_per_s -5%%, scaling_efficiency -0.03). A threshold that could "
                        "never be crossed is refused (tok_per_s:100%%, scaling_efficiency:1)")
    p.add_argument("--only-metrics", action="store_true", help="gate only the --metric rules, not the defaults")
    p.add_argument("--alpha", type=float, default=0.002, help="significance level, in (0, 1); default 0.002")
    p.add_argument("--storage", default=".benchmarks")
    p.add_argument("--allow-different-machines", action="store_true")
    p.add_argument("--json", default=None, metavar="FILE", help="the verdict and every check as JSON (- for stdout)")
    p.set_defaults(func=run)


def load_baselines(specs: list[str], storage: str = ".benchmarks") -> list[dict]:
    """The baseline runs, each a different run: one run given twice (the same file, a copy of it, a
    session named twice) would be pooled with itself and fake a spread between sessions of zero."""
    runs = load_runs(specs, storage)
    seen: dict[str, str] = {}
    for r in runs:
        key = hashlib.sha256(json.dumps(r.get("benchmarks"), sort_keys=True, default=str).encode()).hexdigest()
        if key in seen:
            raise DataError(f"{r['_path']} is the same run as {seen[key]}: give each baseline session once "
                            "(the gate pools their rounds, and a run pooled with itself hides the noise)")
        seen[key] = r["_path"]
    return runs


def run(a) -> int:
    rules = parse_rules(a.metric, a.only_metrics)
    alpha = check_alpha(a.alpha)
    base = load_baselines(a.baseline, a.storage)
    cands = load_runs([a.candidate] if a.candidate else [], a.storage)
    if len(cands) != 1:
        raise DataError(f"--candidate {a.candidate}: holds {len(cands)} runs ({', '.join(c['_path'] for c in cands)}); "
                        f"name one (FILE#SESSION)")
    out = sys.stderr if a.json == "-" else sys.stdout  # `--json -`: stdout holds the JSON alone
    return gate(base, cands[0], rules, alpha, a.allow_different_machines, out=out, json_path=a.json)


def _verdict(code: int, rows: list[dict], missing: list[str], alpha: float) -> str:
    n = len(rows)
    by = {s: [r for r in rows if r["status"] == s] for s in ("REGRESSED", "ERROR", "UNDECIDED")}
    if code == REGRESSED:
        worst = ", ".join(f"{r['benchmark'].split('::')[-1]} {r['metric']}"
                          + (f" {_fmt(r['change'], r['absolute'])}" if r["change"] is not None else "")
                          for r in by["REGRESSED"][:3])
        return f"REGRESSED: {len(by['REGRESSED'])} of {n} checks ({worst}{', ...' if len(by['REGRESSED']) > 3 else ''})"
    if code == ERROR:
        first = by["ERROR"][0]
        return (f"ERROR: {len(by['ERROR'])} of {n} checks could not be made ({first['benchmark'].split('::')[-1]}: "
                f"{first['note']})")
    if code == UNDECIDED:
        und = by["UNDECIDED"]
        floors = [r["min_p"] for r in und if r["min_p"] is not None]
        why = (f"too few rounds: smallest reachable p {min(floors):.2g} >= alpha {alpha}; run >= 7 rounds a side "
               f"(--llm-num-runs) or raise --alpha") if floors else "no per-round samples"
        benches = len({r["benchmark"] for r in und})
        return f"CANNOT DECIDE: {len(und)} of {n} checks on {benches} benchmarks ({why}); exit status 3"
    extra = f"; {len(missing)} benchmarks on one side only" if missing else ""
    return f"PASS: {n} checks, none regressed (alpha {alpha}){extra}"


def gate(base, cand: dict, rules: list[Rule], alpha: float = 0.002, allow_different: bool = False,
         out=None, json_path: str | None = None) -> int:
    """Print the verdict, then what was checked; 0 pass, 1 regression, 2 data error, 3 cannot decide.
    `base`: one run or a list of runs."""
    out = out or sys.stdout
    bases = base if isinstance(base, list) else [base]
    fc = fingerprint(cand)
    odd = [b for b in bases if fingerprint(b) != fc]
    if odd:
        fb = fingerprint(odd[0])
        msg = (f"GPU fingerprints differ: baseline {fb or 'unknown (no machine_info.gpu)'} ({odd[0]['_path']}) vs "
               f"candidate {fc or 'unknown (no machine_info.gpu)'} ({cand['_path']})")
        if not allow_different:
            print(f"llm-bench gate: {msg}; numbers from different machines are not comparable "
                  f"(--allow-different-machines to compare anyway)", file=sys.stderr)
            return ERROR
        print(f"warning: {msg}", file=out)
    rows, missing, not_gated = check(bases, cand, rules, alpha)
    if not rows:
        print(f"llm-bench gate: no gated metric ({', '.join(r.metric for r in rules)}) is in both runs' "
              f"benchmarks in common", file=sys.stderr)
        return ERROR
    statuses = {r["status"] for r in rows}
    code = next((c for c, s in ((REGRESSED, "REGRESSED"), (ERROR, "ERROR"), (UNDECIDED, "UNDECIDED"))
                 if s in statuses), PASS)
    verdict = _verdict(code, rows, missing, alpha)
    if json_path:  # first: a file that cannot be written is an error before any verdict is shown
        doc = {"verdict": VERDICT[code], "exit_status": code, "summary": verdict, "alpha": alpha,
               "baseline": [b["_path"] for b in bases], "candidate": cand["_path"], "checks": rows,
               "one_side_only": missing, "not_gated": not_gated}
        write_output(json_path, json.dumps(json_safe(doc), indent=1) + "\n")
    print(f"llm-bench gate: {verdict}", file=out)
    if code == ERROR and out is not sys.stderr:  # an error is also one line on stderr, as everywhere
        print(f"llm-bench gate: {verdict}", file=sys.stderr)
    print(f"baseline:  {', '.join(b['_path'] for b in bases)}\ncandidate: {cand['_path']}\nalpha={alpha}", file=out)
    for r in rows:
        if r["change"] is None:
            nums = "" if r["baseline"] is None else f"{r['baseline']:.4g} -> -"
        else:
            thr = f"{r['threshold']:.3f}" if r["absolute"] else f"{r['threshold']:.0%}"
            p = "-" if r["p"] is None else f"{r['p']:.2g}"
            nums = (f"{r['baseline']:.4g} -> {r['candidate']:.4g} ({_fmt(r['change'], r['absolute'])}, "
                    f"threshold {thr}, p={p})")
        print(f"{r['status']:9} {r['benchmark']}  {r['metric']}: " + " ".join(x for x in (nums, r["note"]) if x),
              file=out)
    for m in missing:
        print(f"MISSING   {m}", file=out)
    for n in not_gated:
        print(f"NOT GATED {n}: none of {', '.join(r.metric for r in rules)} in the baseline", file=out)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("REGRESSED", "UNDECIDED", "ERROR")}
    print(f"{len(rows)} checks: {counts['REGRESSED']} regressed, {counts['UNDECIDED']} undecidable, "
          f"{counts['ERROR']} errors; {len(missing)} benchmarks on one side only", file=out)
    return code
