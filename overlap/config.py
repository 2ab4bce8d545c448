"""What the built-in engine runs: model shapes (presets with the real Llama-3 shapes, Hugging Face
`config.json` loading) and the engine's typed configuration, the one object every rank receives.

Random weights are enough for speed (decode time does not depend on weight values), so every preset
can run without a download; a local checkpoint directory gives real weights.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from llm_bench import options
from llm_bench.engine import ConfigError

__all__ = ["ConfigError", "EngineConfig", "ModelConfig", "PRESETS", "from_hf_config", "resolve_model"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    # Llama-3 RoPE scaling ({} = plain RoPE): factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict = field(default_factory=dict)
    checkpoint: str | None = None  # directory with config.json + *.safetensors, None = random weights

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_tp(self, tp: int) -> None:
        """Refuse a TP size the head counts (or widths) do not allow, naming the constraint."""
        if tp < 1:
            raise ConfigError(f"TP size must be >= 1, got {tp}")
        problems = []
        if self.num_kv_heads % tp:
            problems.append(f"num_key_value_heads={self.num_kv_heads}")
        if self.num_heads % tp:
            problems.append(f"num_attention_heads={self.num_heads}")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size}")
        if problems:
            raise ConfigError(
                f"TP={tp} does not divide {', '.join(problems)} of model '{self.name}': tensor parallelism "
                f"splits heads and widths evenly over ranks, so pick a TP size that divides them "
                f"(for this model: {', '.join(str(t) for t in self.valid_tp_sizes())})"
            )

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        return [t for t in range(1, limit + 1)
                if not (self.num_kv_heads % t or self.num_heads % t or self.intermediate_size % t
                        or self.vocab_size % t)]

    def param_count(self) -> int:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Small enough for seconds on 2 CPU cores; 8 query / 4 KV heads so TP 1, 2 and 4 all divide.
    "tiny": ModelConfig("tiny", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=3,
                        num_heads=8, num_kv_heads=4, max_position_embeddings=2048,
                        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 256}),
    "llama3-1b": ModelConfig("llama3-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_layers=16, num_heads=32, num_kv_heads=8, tie_word_embeddings=True,
                             max_position_embeddings=131072,
                             rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama3-8b": ModelConfig("llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, max_position_embeddings=131072,
                             rope_scaling=dict(_LLAMA3_ROPE)),
    "llama3-70b": ModelConfig("llama3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, max_position_embeddings=131072,
                              rope_scaling=dict(_LLAMA3_ROPE)),
}


# Each weight's shape in config.json's terms (a norm: one dimension), the one table for loading
# checkpoints, drawing random weights and the messages that name a mismatch.
_WEIGHT_DIMS = {
    "embed_tokens": ("vocab_size", "hidden_size"), "lm_head": ("vocab_size", "hidden_size"),
    "q_proj": ("num_attention_heads*head_dim", "hidden_size"),
    "k_proj": ("num_key_value_heads*head_dim", "hidden_size"),
    "v_proj": ("num_key_value_heads*head_dim", "hidden_size"),
    "o_proj": ("hidden_size", "num_attention_heads*head_dim"),
    "gate_proj": ("intermediate_size", "hidden_size"), "up_proj": ("intermediate_size", "hidden_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
}
_LAYER_WEIGHTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def weight_names(cfg: ModelConfig) -> list[str]:
    """Every weight the model reads, in Hugging Face naming."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    return names + [f"model.layers.{i}.{w}.weight" for i in range(cfg.num_layers) for w in _LAYER_WEIGHTS]


def weight_dims(name: str) -> tuple[str, ...]:
    """Weight `name`'s dimensions in config.json's terms."""
    return _WEIGHT_DIMS.get(name.split(".")[-2], ("hidden_size",))  # norms


def weight_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Weight `name`'s full (unsharded) shape under `cfg`."""
    size = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads}
    return tuple(math.prod(size[f] for f in d.split("*")) for d in weight_dims(name))


def shape_mismatch(cfg: ModelConfig, name: str, shape) -> str | None:
    """Why a checkpoint tensor of `shape` cannot be weight `name` of `cfg` (None: it can)."""
    want = weight_shape(cfg, name)
    if tuple(shape) == want:
        return None
    return (f"tensor '{name}' has shape {list(shape)}, config.json gives {list(want)} "
            f"({' x '.join(weight_dims(name))})")


_MISSING = object()
# Missing optional fields take transformers' LlamaConfig defaults, so the model is the one HF would build.
_HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _field(src: dict, where: str, key: str, kind, default=_MISSING):
    """`src[key]` of type `kind` (int, float or bool; numbers > 0), or a ConfigError naming `where`
    (the file, and the object inside it) and the field."""
    v = src.get(key)
    if v is None:
        if default is _MISSING:
            raise ConfigError(f"{where}: " + (f"field '{key}' is null" if key in src else f"missing field '{key}'"))
        return default
    ok = (isinstance(v, bool) if kind is bool else
          isinstance(v, int) and not isinstance(v, bool) if kind is int else
          isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if not ok:
        want = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ConfigError(f"{where}: field '{key}' is {json.dumps(v)}: expected {want}")
    if kind is not bool and v <= 0:
        raise ConfigError(f"{where}: field '{key}' is {json.dumps(v)}: must be > 0")
    return kind(v)


def _rope(c: dict, where: str) -> tuple[float, dict]:
    """RoPE base and Llama-3 scaling from `rope_parameters` (transformers >= 5) or `rope_theta` and
    `rope_scaling` (earlier): plain RoPE or llama3 only; other scalings would change every logit."""
    params = c.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: field 'rope_parameters' is {json.dumps(params)}: expected an object")
        where, scaling = f"{where} rope_parameters", params
        theta = _field(params, where, "rope_theta", float, _HF_DEFAULTS["rope_theta"])
    else:
        theta = _field(c, where, "rope_theta", float, _HF_DEFAULTS["rope_theta"])
        scaling = c.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{where}: field 'rope_scaling' is {json.dumps(scaling)}: expected an object")
        where = f"{where} rope_scaling"
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "llama3"):
        raise ConfigError(f"{where}: rope_type {json.dumps(kind)} is not supported (plain RoPE or llama3)")
    if kind == "default" or (kind is None and not any(k in scaling for k in _LLAMA3_KEYS)):
        return theta, {}
    rs = {k: _field(scaling, where, k, float) for k in _LLAMA3_KEYS}
    if rs["high_freq_factor"] == rs["low_freq_factor"]:
        raise ConfigError(f"{where}: high_freq_factor and low_freq_factor are both {rs['low_freq_factor']:g}: "
                          "llama3 scaling needs them to differ")
    return theta, rs


def _read_config(cfg_file: Path) -> dict:
    try:
        c = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot be read ({e})") from None
    if not isinstance(c, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object, found {type(c).__name__}")
    return c


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def duplicate_tensor(name: str, first: Path, second: Path) -> str:
    """The refusal of a tensor found in two files: which copy loads would depend on the file order."""
    return (f"{second}: tensor '{name}' is also in {first}: a checkpoint holds each tensor once "
            "(which copy would load depends on the order the files are read)")


def check_checkpoint_tensors(cfg: ModelConfig, files: list[Path]) -> None:
    """Every weight `cfg` needs is in `files` once, of its shape and a float dtype, and nothing the
    model would ignore silently (biases, layers past num_hidden_layers, a second copy in another
    file) is: read from the safetensors headers only, before any weight."""
    from safetensors import SafetensorError, safe_open

    needed = set(weight_names(cfg))
    found: set[str] = set()
    where: dict[str, Path] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="numpy")
            tensors = {k: h.get_slice(k) for k in h.keys()}
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
        for name, t in tensors.items():
            if name in where:
                raise ConfigError(duplicate_tensor(name, where[name], f))
            where[name] = f
            if name.endswith(".bias"):
                raise ConfigError(f"{f}: tensor '{name}': this engine's Llama has no biases, so the "
                                  "checkpoint's model is not the one it would run")
            layer = _LAYER_INDEX.match(name)
            if layer and int(layer.group(1)) >= cfg.num_layers:
                raise ConfigError(f"{f}: tensor '{name}' is of layer {layer.group(1)}, but config.json's "
                                  f"num_hidden_layers is {cfg.num_layers}: that layer would be left out silently")
            if name not in needed:
                continue  # an extra that changes nothing (rotary_emb.inv_freq: RoPE is computed from config)
            if t.get_dtype() not in _FLOAT_DTYPES:
                raise ConfigError(f"{f}: tensor '{name}' is {t.get_dtype()}: only float weights "
                                  f"({', '.join(_FLOAT_DTYPES)}) load")
            why = shape_mismatch(cfg, name, t.get_shape())
            if why:
                raise ConfigError(f"{f}: {why}")
            found.add(name)
    missing = [n for n in weight_names(cfg) if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{files[0].parent}: no tensor '{missing[0]}'{more} in its *.safetensors files")


def from_hf_config(path: str | Path) -> ModelConfig:
    """A Hugging Face Llama checkpoint directory: `config.json` checked field by field, then the
    safetensors headers checked against it. Every problem is one ConfigError naming the file and the
    field (or tensor), before any weight is read or any process started."""
    given, path = str(path), Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():  # named as given: Path() drops a trailing '/' ('tiny/' is no preset)
        raise ConfigError(f"model '{given}' is not a directory (presets are named without a path: "
                          f"{', '.join(PRESETS)})")
    if not cfg_file.is_file():
        raise ConfigError(f"checkpoint directory '{path}' has no config.json: a Hugging Face Llama "
                          f"checkpoint needs config.json next to its *.safetensors files")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint directory '{path}' has no *.safetensors files "
                          f"(only safetensors are loaded; pickled .bin files never are)")
    c = _read_config(cfg_file)
    where = str(cfg_file)
    if c.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type {json.dumps(c['model_type'])} is not supported (llama only)")
    for flag in ("attention_bias", "mlp_bias"):
        if _field(c, where, flag, bool, False):
            raise ConfigError(f"{where}: {flag} is true: this engine's Llama has no biases")
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {json.dumps(c['hidden_act'])} is not supported (silu only)")
    size = {k: _field(c, where, k, int) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads")}
    heads, hidden = size["num_attention_heads"], size["hidden_size"]
    kv_heads = _field(c, where, "num_key_value_heads", int, heads)
    if hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _field(c, where, "head_dim", int, hidden // heads)
    if head_dim != hidden // heads:
        raise ConfigError(f"{where}: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                          f"{hidden // heads} (not supported)")
    if head_dim % 2:
        raise ConfigError(f"{where}: head dimension {head_dim} is odd: RoPE rotates pairs of values")
    theta, rope_scaling = _rope(c, where)
    cfg = ModelConfig(
        name=path.name, vocab_size=size["vocab_size"], hidden_size=hidden,
        intermediate_size=size["intermediate_size"], num_layers=size["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads, rope_theta=theta,
        rms_norm_eps=_field(c, where, "rms_norm_eps", float, _HF_DEFAULTS["rms_norm_eps"]),
        max_position_embeddings=_field(c, where, "max_position_embeddings", int,
                                       _HF_DEFAULTS["max_position_embeddings"]),
        tie_word_embeddings=_field(c, where, "tie_word_embeddings", bool, False),
        rope_scaling=rope_scaling, checkpoint=str(path.resolve()),
    )
    check_checkpoint_tensors(cfg, files)
    return cfg


def resolve_model(model: str) -> ModelConfig:
    """A preset name or a local checkpoint directory."""
    if model in PRESETS:
        return PRESETS[model]
    if "/" in model or Path(model).exists():
        return from_hf_config(model)
    raise ConfigError(f"unknown model '{model}': use a preset ({', '.join(PRESETS)}) "
                      f"or a local Hugging Face checkpoint directory")


def device_conflict(device: str, allreduce: str, decode_attention: str, gemv: str, cuda_graphs: bool | None,
                    pdl: bool | None) -> str | None:
    """Why an engine option asked for by name cannot run on `device` ("cpu" or "cuda"; None: each can),
    as `--OPTION VALUE: why`: refused once, before any rank starts, rather than failing in every rank.
    `nccl` on CPU is the process group's all-reduce there (gloo), which the results record."""
    if device == "cpu":
        if allreduce in ("symm", "lamport"):
            return (f"--allreduce {allreduce}: '{allreduce}' needs CUDA GPUs (symmetric memory); on CPU the "
                    "all-reduce is the process group's, gloo (use auto or nccl)")
        if cuda_graphs:
            return "--cuda-graphs: CUDA graphs need a CUDA device; the engine runs on cpu"
        if pdl:
            return "--pdl: programmatic dependent launch needs a CUDA GPU (Hopper or later); the engine runs on cpu"
    for name, choice in (("decode_attention", decode_attention), ("gemv", gemv)):
        if choice == "triton":
            import torch

            from .kernels import unavailable_reason

            why = unavailable_reason(torch.device(device))
            if why:
                return f"--{name.replace('_', '-')} triton: {why}"
    return None


@dataclass(frozen=True)
class EngineConfig:
    """One built-in engine: model, TP size, overlap mode, the shapes it serves, and every engine option
    of the contract (`llm_bench.options`, where their defaults and ranges are declared). Checked when
    made; `resolved()` fills what depends on the device. The ranks receive it as is."""
    model: str = "tiny"
    tp: int = 1
    device: str = "cpu"                  # "cpu" or "cuda"
    overlap: str = "none"
    batch_sizes: tuple = (1,)            # decode graphs are captured for these at build time
    max_seq: int = 256                   # prompt + output tokens the KV cache holds
    dtype: str | None = None             # default: bfloat16 on GPU, float32 on CPU
    gpu_ids: tuple | None = None         # visible GPU indices for ranks 0..tp-1 (default 0..tp-1)
    build_timeout: float = 1800.0        # start-up: weights, compiles, graphs
    copy_bw: float | None = None         # known copy bandwidth (bytes/s) to skip measuring it again
    attention_block_t: int = 64          # decode-attention tuning: keys per thread block ...
    attention_warps: int = 4             # ... and warps (scripts/tune_decode_attention.py)
    # The engine options of the contract (same names, defaults and checks as the pytest options).
    engine_timeout: float = options.default("engine_timeout")
    allreduce: str = options.default("allreduce")
    num_streams: int = options.default("num_streams")
    pipeline_min_batch: int | None = None   # device-dependent defaults: filled by resolved()
    pipeline_min_tokens: int | None = None
    prefetch_mb: float | None = options.default("prefetch_mb")
    cuda_graphs: bool | None = options.default("cuda_graphs")
    compile: bool | None = options.default("compile")
    decode_attention: str = options.default("decode_attention")
    gemv: str = options.default("gemv")
    pdl: bool | None = options.default("pdl")
    seed: int = options.default("seed")

    def __post_init__(self):
        try:
            for name in options.engine_fields():
                options.check(name, getattr(self, name))
            options.check("overlap_modes", [self.overlap])
            options.check("tp_sizes", [self.tp])
            options.check("batch_sizes", list(self.batch_sizes))
        except options.OptionError as e:
            raise ConfigError(str(e)) from None
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.max_seq < 2:
            raise ConfigError(f"max_seq must be >= 2 (a prompt token and an output token), got {self.max_seq}")
        why = device_conflict(self.device, self.allreduce, self.decode_attention, self.gemv, self.cuda_graphs,
                              self.pdl)
        if why:
            raise ConfigError(why)

    def resolved(self) -> "EngineConfig":
        """Device-dependent choices made: bf16, torch.compile, CUDA graphs and PDL on CUDA; fp32 and
        none of them on CPU (compiling needs a C++ compiler and minutes there); where pipelining
        pays (measured on GPUs; everywhere on CPU, where the modes are checked for correctness)."""
        cuda = self.device == "cuda"
        return replace(
            self, batch_sizes=tuple(sorted(set(int(b) for b in self.batch_sizes))),
            dtype=self.dtype or ("bfloat16" if cuda else "float32"),
            compile=cuda if self.compile is None else self.compile,
            cuda_graphs=cuda if self.cuda_graphs is None else self.cuda_graphs,
            pdl=cuda if self.pdl is None else self.pdl,
            pipeline_min_batch=self.pipeline_min_batch or options.default("pipeline_min_batch", cuda),
            pipeline_min_tokens=self.pipeline_min_tokens or options.default("pipeline_min_tokens", cuda),
            gpu_ids=tuple(self.gpu_ids) if self.gpu_ids else tuple(range(self.tp)))

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def schedule(self):
        """Where this engine's overlap mode splits its work (overlap.streams.Schedule); resolved config."""
        from .streams import Schedule

        return Schedule(self.overlap, self.num_streams, self.pipeline_min_batch, self.pipeline_min_tokens)
