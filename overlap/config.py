"""What the built-in engine runs: model shapes (presets with the real Llama-3 shapes, Hugging Face
`config.json` loading) and the engine's typed configuration, the one object every rank receives.

Random weights are enough for speed (decode time does not depend on weight values), so every preset
can run without a download; a local checkpoint directory gives real weights.
"""
from __future__ import annotations

import json
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


def from_hf_config(path: str | Path) -> ModelConfig:
    """Read a Hugging Face Llama checkpoint directory's `config.json`."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"model '{path}' is neither a preset ({', '.join(PRESETS)}) nor a directory")
    if not cfg_file.is_file():
        raise ConfigError(f"checkpoint directory '{path}' has no config.json: a Hugging Face Llama "
                          f"checkpoint needs config.json next to its *.safetensors files")
    if not list(path.glob("*.safetensors")):
        raise ConfigError(f"checkpoint directory '{path}' has no *.safetensors files "
                          f"(only safetensors are loaded; pickled .bin files never are)")
    c = json.loads(cfg_file.read_text())
    rs = c.get("rope_scaling") or {}
    if rs and rs.get("rope_type", rs.get("type")) not in ("llama3", None):
        raise ConfigError(f"rope_scaling type {rs.get('rope_type')!r} is not supported (only llama3)")
    return ModelConfig(
        name=path.name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        rope_theta=float(c.get("rope_theta", 10000.0)), rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=c.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope_scaling={k: rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings") if k in rs},
        checkpoint=str(path.resolve()),
    )


def resolve_model(model: str) -> ModelConfig:
    """A preset name or a local checkpoint directory."""
    if model in PRESETS:
        return PRESETS[model]
    if "/" in model or Path(model).exists():
        return from_hf_config(model)
    raise ConfigError(f"unknown model '{model}': use a preset ({', '.join(PRESETS)}) "
                      f"or a local Hugging Face checkpoint directory")


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

    def resolved(self) -> "EngineConfig":
        """Device-dependent choices made: bf16, torch.compile, CUDA graphs and PDL on CUDA; fp32 and
        none of them on CPU (compiling needs a C++ compiler and minutes there); where pipelining
        pays (measured on GPUs; everywhere on CPU, where the modes are checked for correctness)."""
        cuda = self.device == "cuda"
        return replace(
            self, batch_sizes=tuple(sorted(set(int(b) for b in self.batch_sizes))),
            dtype=self.dtype or ("bfloat16" if cuda else "float32"),
            compile=cuda if self.compile is None else self.compile,
            cuda_graphs=cuda if self.cuda_graphs is None else (self.cuda_graphs and cuda),
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
