"""The options contract: every benchmark and engine option declared once (name, type, choices, range,
CPU and GPU default, help). The pytest options (`fixtures/options.py`), `python -m overlap.generate`
and the built-in engine's `EngineConfig` are all built from this table, and every value is checked
here, where it enters: a value out of range is refused with one line, never replaced by a default.

pytest option names carry the prefix `--llm-` (as pytest-benchmark's carry `--benchmark-`), so no
other plugin's options can clash with ours; the original experiment scripts' flags that are specific
enough not to collide (`--tp-sizes`, `--max-tokens`, ...) are registered as aliases too."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

PREFIX = "--llm-"
# Overlap modes of the built-in engine (what each switches on: overlap/streams.py).
OVERLAP_MODES = ("none", "prefetch", "pipeline", "double_buffer", "full")
ALLREDUCE_CHOICES = ("nccl", "symm", "lamport", "auto")
KERNEL_CHOICES = {"decode_attention": ("auto", "triton", "sdpa"), "gemv": ("auto", "triton", "torch")}


class OptionError(ValueError):
    """A value an option does not accept; the message names the option, the value and the rule."""


@dataclass(frozen=True)
class ByDevice:
    """A default that depends on where the benchmark runs."""
    cpu: Any
    gpu: Any

    def pick(self, gpu: bool):
        return self.gpu if gpu else self.cpu


@dataclass(frozen=True)
class Option:
    name: str                      # attribute name everywhere (Settings, EngineConfig)
    help: str
    type: Callable = str           # element type: int, float, str, bool (a flag), or "bool?" (on/off/unset)
    default: Any = None            # a value, a ByDevice, or None (resolved by the plugin)
    choices: tuple | None = None
    min: float | None = None       # inclusive bounds
    max: float | None = None
    above: float | None = None     # exclusive lower bound
    many: bool = False             # a list of values (nargs="+")
    engine: bool = False           # a field of the built-in engine's EngineConfig
    alias: bool = False            # also registered without the prefix (original experiment flag)
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def rule(self) -> str:
        parts = []
        if self.choices:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.above is not None:
            parts.append(f"> {_bound(self.above)}")
        if self.min is not None:
            parts.append(f">= {_bound(self.min)}")
        if self.max is not None:
            parts.append(f"<= {_bound(self.max)}")
        return " and ".join(parts)

    def check_one(self, value):
        """One element converted to its type and checked; OptionError with the rule otherwise."""
        kind = {int: "an integer", float: "a number"}.get(self.type, "a value")
        try:
            if self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                v = int(value)
            elif self.type is float:
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
            elif self.type is str:
                v = str(value)
            else:
                v = value
        except (TypeError, ValueError):
            raise OptionError(f"{self.flag} {value!r}: expected {kind}"
                              + (f" ({self.rule()})" if self.rule() else "")) from None
        bad = (self.choices and v not in self.choices) or \
            (self.min is not None and v < self.min) or (self.max is not None and v > self.max) or \
            (self.above is not None and v <= self.above)
        if bad:
            raise OptionError(f"{self.flag} {value!r}: must be {self.rule()}")
        return v

    def check(self, value):
        """The option's value (a list for `many`) checked; None passes for options without a default."""
        if value is None:
            return None
        if self.type is bool or self.type == "bool?":
            if not isinstance(value, bool):
                raise OptionError(f"{self.flag} {value!r}: expected true or false")
            return value
        if self.many:
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                value = [value]
            vals = [self.check_one(v) for v in value]
            if not vals:
                raise OptionError(f"{self.flag}: give at least one value")
            if len(set(vals)) != len(vals):
                raise OptionError(f"{self.flag} {' '.join(map(str, value))}: a value is given twice")
            return vals
        return self.check_one(value)

    def argparse_kwargs(self, prefix_in_errors: str | None = None) -> dict:
        """Keyword arguments for argparse's / pytest's add_argument: the type function refuses bad
        values at parse time with this option's rule."""
        rule = f" [{self.rule()}]" if self.rule() and not self.choices else ""
        kw: dict = {"help": self.help + rule + self._default_help(), "dest": self.name}
        if self.type is bool:
            kw.update(action="store_true", default=False)
            return kw
        if self.type == "bool?":
            kw.update(action=argparse.BooleanOptionalAction, default=None)
            return kw

        def parse(text: str):
            try:
                return self.check_one(text)
            except OptionError as e:  # argparse prefixes "argument --flag:" itself; the value follows
                raise argparse.ArgumentTypeError(f"{str(e).split(': ', 1)[1]}, got {text!r}") from None
        parse.__name__ = {int: "int", float: "float"}.get(self.type, "value")
        kw.update(type=parse, default=None)
        if self.many:
            kw["nargs"] = "+"
        if self.metavar:
            kw["metavar"] = self.metavar
        elif self.choices:
            kw["metavar"] = "{" + ",".join(self.choices) + "}"
        else:
            kw["metavar"] = {int: "N", float: "X"}.get(self.type, "VALUE")
        return kw

    def _default_help(self) -> str:
        d = self.default
        if isinstance(d, ByDevice):
            return f" (default: {_show(d.cpu)} on CPU, {_show(d.gpu)} on a GPU)"
        if d is None or self.type is bool:
            return ""
        return f" (default: {_show(d)})"


def _bound(v) -> str:
    """A bound as written in a rule: whole numbers exactly (1048576, not 1.04858e+06)."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    # -- what runs -----------------------------------------------------------------------------------
    Option("engine", "engine to benchmark", choices=("builtin", "mlc"), default="builtin"),
    Option("model", "builtin: preset (tiny, llama3-1b, llama3-8b, llama3-70b) or a local Hugging Face "
           "checkpoint directory; mlc: an MLC model directory or HF:// id", default=ByDevice("tiny", "llama3-8b")),
    Option("model_lib", "mlc: compiled model library, '{tp}' in the path when several TP sizes run"),
    Option("device", "where the built-in engine runs (auto: cuda when a GPU is visible)",
           choices=("auto", "cpu", "cuda"), default="auto"),
    Option("tp_sizes", "TP sizes (default: powers of two up to the visible GPUs; 1 2 on CPU)", type=int,
           min=1, max=64, many=True, alias=True),
    Option("overlap_modes", "overlap modes of the overlap benchmarks (default: all)", choices=OVERLAP_MODES,
           many=True, alias=True, default=OVERLAP_MODES),
    Option("batch_sizes", "batch sizes (requests generated together)", type=int, min=1, max=4096, many=True,
           default=ByDevice((1, 4), (1, 16))),
    Option("prompt_len", "prompt tokens per request", type=int, min=1, default=ByDevice(16, 128)),
    Option("max_tokens", "output tokens per request (exactly: no early stop)", type=int, min=1,
           default=ByDevice(16, 128), alias=True),
    Option("num_runs", "timed rounds per benchmark", type=int, min=1, max=100000, default=ByDevice(3, 10),
           alias=True),
    Option("warmup_runs", "untimed rounds before them", type=int, min=0, max=100000, default=ByDevice(1, 3),
           alias=True),
    # -- what is recorded ----------------------------------------------------------------------------
    Option("enable_trace", "write a Chrome/Perfetto trace per benchmark", type=bool, alias=True),
    Option("torch_profile", "builtin: one extra generation per benchmark under torch.profiler, ranks merged "
           "into <results-dir>/traces/<name>-torch-<session>.json", type=bool),
    Option("profile_communication", "also run each TP>1 engine with collectives replaced by no-ops: "
           "stores comm_share (and comm_hidden_share for overlap modes)", type=bool, alias=True),
    Option("results_dir", "live results file (runs.jsonl) and traces", default="results", metavar="DIR"),
    Option("gate_baseline", "at session end, gate this run against stored run(s) (ids, files): exit 1 on a "
           "significant regression (the rules of `llm-bench gate`)", many=True, metavar="RUN"),
    Option("engine_timeout", "seconds before a silent engine is declared hung", type=float, min=1,
           max=1e6, default=600.0, engine=True),
    # -- the built-in engine -------------------------------------------------------------------------
    Option("allreduce", "builtin all-reduce: nccl (the process group's: NCCL on GPUs, gloo on CPU, which the "
           "results record); symm (symmetric-memory one-shot, GPUs only); lamport (symm, and each decode "
           "all-reduce fused with the next residual add + RMSNorm in one Lamport kernel); auto (the fastest of "
           "these that works here)",
           choices=ALLREDUCE_CHOICES, default="auto", engine=True),
    Option("num_streams", "builtin pipeline/full: micro-batches (decode) or chunks (prefill); at most one per "
           "sequence (token) of the step, and the results record how many ran", type=int, min=2, max=64,
           default=2, engine=True, alias=True),
    Option("pipeline_min_batch", "builtin pipeline/full: split decode steps into micro-batches from this batch "
           "size (below, each micro-batch re-reading the weights costs more than the all-reduce it hides)",
           type=int, min=2, max=1 << 20, default=ByDevice(2, 512), engine=True),
    Option("pipeline_min_tokens", "builtin pipeline/full: split prefill into chunks from this many prompt tokens "
           "(batch x prompt length)", type=int, min=1, max=1 << 30, default=ByDevice(1, 4096), engine=True),
    Option("prefetch_mb", "builtin prefetch/full: MB of the next weight pulled into L2 per all-reduce "
           "(default: half of L2; 1 MiB on CPU, where the read runs in line)", type=float, min=0, engine=True),
    Option("cuda_graphs", "builtin: decode steps and prefill as CUDA graphs", type="bool?", engine=True),
    Option("compile", "builtin: torch.compile the blocks (default: on for cuda, off for cpu)", type="bool?",
           engine=True),
    Option("decode_attention", "builtin decode attention: the fused Triton kernel, SDPA, or auto (Triton "
           "where it runs)", choices=KERNEL_CHOICES["decode_attention"], default="auto", engine=True),
    Option("gemv", "builtin batch-1 weight products: Triton GEMV with fixed configurations, torch's, or auto "
           "(Triton where it runs)", choices=KERNEL_CHOICES["gemv"], default="auto", engine=True),
    Option("pdl", "builtin: launch the Triton kernels with programmatic dependent launch on Hopper",
           type="bool?", engine=True),
    Option("seed", "seed of the random weights and prompts", type=int, min=0, max=2**63 - 1, default=0,
           engine=True),
)}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`PROG: error: ...`), exit 2: every CLI of the suite."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def default(name: str, gpu: bool = False):
    """The default of option `name` on this kind of machine (None: the caller resolves it)."""
    d = OPTIONS[name].default
    d = d.pick(gpu) if isinstance(d, ByDevice) else d
    return list(d) if isinstance(d, tuple) else d


def check(name: str, value):
    """`value` of option `name`, checked (OptionError otherwise)."""
    return OPTIONS[name].check(value)


def engine_fields() -> list[str]:
    """The options that are fields of the built-in engine's EngineConfig."""
    return [o.name for o in OPTIONS.values() if o.engine]


def add_arguments(parser: argparse.ArgumentParser, names: list[str], gpu: bool | None = None) -> None:
    """Add options `names` to an argparse parser (plain names, no prefix), with the defaults for
    `gpu` filled in (None: left unset, to be resolved by the caller)."""
    for n in names:
        o = OPTIONS[n]
        kw = o.argparse_kwargs()
        if gpu is not None and o.type not in (bool, "bool?"):
            kw["default"] = default(n, gpu)
        parser.add_argument(o.flag, **kw)


def add_single(parser: argparse.ArgumentParser, flag: str, of: str, help: str, default=None) -> None:
    """One value of list option `of` (e.g. `--tp` for `tp_sizes`), checked by the same rule."""
    kw = OPTIONS[of].argparse_kwargs()
    kw.pop("nargs", None)
    kw.update(help=help, dest=flag.lstrip("-").replace("-", "_"), default=default)
    parser.add_argument(flag, **kw)
