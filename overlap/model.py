"""A Llama-family decoder with Megatron-style tensor parallelism, in the spirit of gpt-fast.

Per rank: QKV and gate/up are column-parallel (fused, this rank's heads/columns), o_proj and down are
row-parallel followed by an all-reduce; the embedding is replicated (a lookup reads only a few rows);
the LM head is sharded over the vocabulary and sampling gathers (max, index) pairs. The KV cache is
static, sized batch x (prompt + output). Weights use Hugging Face's layout and RoPE convention
(rotate-half), so a HF checkpoint loads as is and logits match `LlamaForCausalLM`.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from . import gemv, kernels
from .comm import Comm
from .config import ConfigError, ModelConfig, duplicate_tensor, shape_mismatch, weight_names, weight_shape
from .streams import StreamManager


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling (the same formula as HF's `llama3` rope type)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling
    if not rs:
        return inv.float()
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def add_rms_norm(x, delta, norm_w, eps: float):
    """Residual add of the previous sublayer's all-reduced output `delta` (None before the first
    layer), then RMSNorm: (residual stream, normalised input of the next GEMM). One kernel when
    compiled. The add lives here, not after the all-reduce, so that it fuses with the norm; the
    normalised activation is written out rather than recomputed inside the GEMV that reads it
    (Inductor's fused prologue was slower per GEMV: NOTES-gpu.md, third session)."""
    if delta is not None:
        x = x + delta
    return x, F.rms_norm(x, (x.shape[-1],), norm_w, eps)


def matvec(a, w):
    """`a @ w.T` with a weight in HF layout [out, in]: every projection (a GEMV at batch 1)."""
    return a @ w.t()


def attend(qkv, kc, vc, cos, sin, pos, mask, n_heads: int, n_kv: int, hd: int):
    """RoPE on q and k, K/V written into the cache views `kc`, `vc` at `pos`, attention over the cache:
    [B, S, n_heads * hd]. (`kernels.decode_attention` is the same for one position, in one kernel.)

    GQA without copying K/V: the G query heads that share a KV head are folded into the query
    length ([B, Hkv, G*S, D]) so one plain attention call reads each cached K/V once. `mask` is
    additive (0 or -inf), built once per step: a boolean one is converted again in every layer."""
    B, S, _ = qkv.shape
    nq, nk = n_heads * hd, n_kv * hd
    qk = qkv[..., :nq + nk].view(B, S, n_heads + n_kv, hd)
    qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k in one pass
    q = qk[:, :, :n_heads].transpose(1, 2)
    k = qk[:, :, n_heads:].transpose(1, 2)
    v = qkv[..., nq + nk:].view(B, S, n_kv, hd).transpose(1, 2)
    kc[:, :, pos] = k
    vc[:, :, pos] = v
    qf = q.reshape(B, n_kv, (n_heads // n_kv) * S, hd)
    y = F.scaled_dot_product_attention(qf, kc, vc, attn_mask=mask)
    # reshape, not view: SDPA's output layout depends on the backend (fp32 on CUDA is not contiguous)
    return y.reshape(B, n_heads, S, hd).transpose(1, 2).reshape(B, S, nq)


def one_row(t: torch.Tensor) -> bool:
    """Whether `t` [..., K] is a single row (batch-1 decode): where products are GEMVs, not GEMMs."""
    return t.numel() == t.shape[-1]


def swiglu_up(h, w13, inter: int):
    """SiLU(h @ gate.T) * (h @ up.T) with the fused gate/up weight `w13` [2 * inter, hidden].

    Its own block, apart from the down projection: compiled together, Inductor fused SiLU*mul into
    the down GEMV's loads and recomputed it for every output row. At one row (batch-1 decode) the two
    halves are separate products: compiled, each becomes a multiply-reduce over the same input, which
    Inductor fuses into one kernel with SiLU*mul as its epilogue. With more rows they are GEMMs, which
    take no epilogue: one GEMM over both halves."""
    if one_row(h):
        g, u = matvec(h, w13[:inter]), matvec(h, w13[inter:])
    else:
        g, u = matvec(h, w13).split(inter, dim=-1)
    return F.silu(g) * u


def greedy_local(logits):
    """This rank's vocabulary shard of the logits reduced to each row's (max logit, local index):
    greedy sampling never needs the whole logits gathered.

    In two levels, over up to 256 equal blocks of the vocabulary and then over the blocks' maxima:
    Inductor runs a one-row max+argmax over 128K logits as one looped program; the blocks run in
    parallel. Ties still go to the lowest index (first block, first in it)."""
    logits = logits.float()
    n = logits.shape[-1]
    k = math.gcd(n, 256)
    if k == 1:
        return logits.max(dim=-1)
    val, idx = logits.view(*logits.shape[:-1], k, n // k).max(dim=-1)
    best, blk = val.max(dim=-1)
    return best, idx.gather(-1, blk.unsqueeze(-1)).squeeze(-1) + blk * (n // k)


class Blocks(NamedTuple):
    """The functions a forward pass is made of: eager, or each under torch.compile."""
    norm: Callable
    matvec: Callable
    attend: Callable
    swiglu_up: Callable
    greedy: Callable


EAGER = Blocks(add_rms_norm, matvec, attend, swiglu_up, greedy_local)


def compiled_blocks() -> Blocks:
    """The blocks under torch.compile: whole-graph, static shapes. The weights are arguments, so all
    layers share one compiled kernel set per (batch, length) shape; collectives stay outside (they
    run between the blocks), and the decode-step CUDA graph captures the compiled kernels like any
    others.

    Coordinate-descent tuning is on for the blocks with weight products only: at batch 1 Inductor then
    writes a matrix-vector product as a multiply-reduce Triton kernel tuned per shape, faster than
    cuBLAS's GEMV; for the norm and attention blocks the tuner's picks varied between processes and
    were no faster (NOTES-gpu.md, fourth session)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    # One entry per shape (every projection x decode/prefill x batch size x pipeline chunk): past the
    # limit Dynamo would fall back to eager for new shapes without failing, a silent slowdown.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))

    def comp(f, tuned: bool):
        return torch.compile(f, fullgraph=True, dynamic=False,
                             options={"coordinate_descent_tuning": True} if tuned else None)
    return Blocks(norm=comp(add_rms_norm, False), matvec=comp(matvec, True), attend=comp(attend, False),
                  swiglu_up=comp(swiglu_up, True), greedy=comp(greedy_local, False))


def with_triton_gemv(b: Blocks, pdl: bool) -> Blocks:
    """`b` with its one-row blocks (batch-1 decode) in overlap/gemv.py's kernels: the weight products
    with a fixed configuration per shape, and the add+RMSNorm between them, so that with `pdl` on
    Hopper every kernel from one GEMV to the next is launched with PDL. More rows (prefill, larger
    batches) stay in `b`."""
    def norm(x, delta, norm_w, eps: float):
        return gemv.add_rms_norm(x, delta, norm_w, eps, pdl=pdl) if one_row(x) else b.norm(x, delta, norm_w, eps)

    def mv(a, w):
        return gemv.gemv(a, w, pdl=pdl) if one_row(a) else b.matvec(a, w)

    def up(h, w13, inter: int):
        return gemv.gemv_swiglu(h, w13, inter, pdl=pdl) if one_row(h) else b.swiglu_up(h, w13, inter)
    return b._replace(norm=norm, matvec=mv, swiglu_up=up)


class WeightSource:
    """Full-size weights by Hugging Face name, either from safetensors or seeded random numbers.

    Random weights are drawn per tensor from a seed derived from (seed, name) at full size and then
    sliced, so every TP size sees the same model: TP=N must give TP=1's tokens. A checkpoint's
    tensors were checked against its config when it was resolved (config.from_hf_config); each is
    checked again as it is read, so a file changed since fails with its name, not a shape error."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.seed, self.device, self.dtype = cfg, seed, device, dtype
        self._files = None
        if cfg.checkpoint:
            from pathlib import Path

            from safetensors import safe_open

            self._files, self._paths = {}, {}
            for f in sorted(Path(cfg.checkpoint).glob("*.safetensors")):
                h = safe_open(str(f), framework="pt", device="cpu")
                for k in h.keys():
                    if k in self._paths:  # as config.check_checkpoint_tensors refuses it
                        raise ConfigError(duplicate_tensor(k, self._paths[k], f))
                    self._files[k], self._paths[k] = h, f

    def get(self, name: str, dim: int | None = None, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Shard `rank` of `world` of tensor `name` along `dim` (None = replicated)."""
        if self._files is not None:
            if name not in self._files:
                raise ConfigError(f"{self.cfg.checkpoint}: no tensor '{name}' in its *.safetensors files")
            sl = self._files[name].get_slice(name)
            full = sl.get_shape()
            why = shape_mismatch(self.cfg, name, full)
            if why:
                raise ConfigError(f"{self._paths[name]}: {why}")
            if dim is None:
                t = sl[:]
            else:
                n = full[dim] // world
                t = sl[rank * n:(rank + 1) * n] if dim == 0 else sl[:, rank * n:(rank + 1) * n]
            return t.to(device=self.device, dtype=self.dtype)
        shape = weight_shape(self.cfg, name)
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:6], "little")
        g = torch.Generator(device=self.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        else:
            gen_dtype = torch.float32 if self.dtype == torch.float32 else self.dtype
            t = torch.randn(shape, generator=g, device=self.device, dtype=gen_dtype).mul_(0.02)
        if dim is not None:
            n = shape[dim] // world
            t = t.narrow(dim, rank * n, n)
        return t.to(self.dtype).contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model in HF naming (for loading the same weights into transformers)."""
        return {n: self.get(n) for n in weight_names(self.cfg)}


class Layer:
    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "k_cache", "v_cache")


class TPLlama:
    """One rank's shard of the model plus its KV cache. Not an nn.Module: plain tensors keep the
    forward pass short and graph-capturable."""

    def __init__(self, cfg: ModelConfig, comm: Comm, streams: StreamManager, *, max_batch: int,
                 max_seq: int, seed: int = 0, dtype: torch.dtype = torch.float32, compile: bool = False,
                 decode_attention: str = "sdpa", gemv: str = "torch", tuning: kernels.Tuning = kernels.DEFAULT_TUNING):
        cfg.check_tp(comm.world)
        self.cfg, self.comm, self.streams = cfg, comm, streams
        self.rank, self.world, self.device, self.dtype = comm.rank, comm.world, comm.device, dtype
        self.max_batch, self.max_seq = max_batch, max_seq
        c, r, w = cfg, comm.rank, comm.world
        self.n_heads, self.n_kv = c.num_heads // w, c.num_kv_heads // w
        self.hd = c.head_dim
        self.inter = c.intermediate_size // w
        self.vocab_local = c.vocab_size // w
        src = WeightSource(cfg, seed, self.device, dtype)
        self.embed = src.get("model.embed_tokens.weight")
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        self.lm_head = src.get(head, 0, r, w)
        self.norm = src.get("model.norm.weight")
        self.layers: list[Layer] = []
        cache_shape = (max_batch, self.n_kv, max_seq, self.hd)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            L = Layer()
            L.attn_norm = src.get(p + "input_layernorm.weight")
            L.ffn_norm = src.get(p + "post_attention_layernorm.weight")
            L.wqkv = torch.cat([src.get(p + f"self_attn.{n}_proj.weight", 0, r, w) for n in "qkv"])
            L.wo = src.get(p + "self_attn.o_proj.weight", 1, r, w)
            L.w13 = torch.cat([src.get(p + "mlp.gate_proj.weight", 0, r, w),
                               src.get(p + "mlp.up_proj.weight", 0, r, w)])
            L.w2 = src.get(p + "mlp.down_proj.weight", 1, r, w)
            L.k_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
            L.v_cache = torch.zeros(cache_shape, device=self.device, dtype=dtype)
            self.layers.append(L)
        inv = rope_inv_freq(cfg).to(self.device)
        ang = torch.outer(torch.arange(max_seq, device=self.device, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        self.key_pos = torch.arange(max_seq, device=self.device)
        self.tuning = tuning
        self.decode_attention = kernels.choose("decode_attention", decode_attention, self.device)
        self.gemv = kernels.choose("gemv", gemv, self.device)
        self.fns = compiled_blocks() if compile else EAGER
        if self.gemv == "triton":
            self.fns = with_triton_gemv(self.fns, tuning.pdl)
        # The decode-attention kernel's finished-block counters: zeros that each call leaves at zero.
        self.attn_counters = torch.zeros(max_batch * self.n_kv, dtype=torch.int32, device=self.device)

    # -- sizes for bandwidth accounting --------------------------------------------------------------
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads on this rank (the embedding is a row lookup)."""
        per_layer = sum(t.numel() * t.element_size() for L in self.layers
                        for t in (L.attn_norm, L.wqkv, L.wo, L.ffn_norm, L.w13, L.w2))
        head = self.lm_head.numel() * self.lm_head.element_size()
        return per_layer + head + self.norm.numel() * self.norm.element_size()

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes this rank reads per cached token per sequence, over all layers."""
        return 2 * self.cfg.num_layers * self.n_kv * self.hd * self.dtype.itemsize

    # -- the forward pass ----------------------------------------------------------------------------
    def _decode_kernel(self, seq_len: int) -> bool:
        """Whether attention over `seq_len` new positions runs in kernels.decode_attention."""
        return self.decode_attention == "triton" and seq_len == 1

    def _rope_and_mask(self, pos: torch.Tensor):
        """Per forward pass, not per layer: RoPE tables at `pos` and the causal mask over the static
        cache, repeated for the folded GQA query heads. The decode kernel reads the whole tables and
        `pos` itself: building them would be ~6 kernels per step for nothing."""
        if self._decode_kernel(len(pos)):
            return None, None, pos, None
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        visible = self.key_pos[None, :] <= pos[:, None]  # [S, max_seq]
        mask = torch.zeros(visible.shape, device=self.device, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        return cos, sin, pos, mask.repeat(self.n_heads // self.n_kv, 1)

    def _attn(self, L: Layer, h: torch.Tensor, rope, b0: int, b1: int) -> torch.Tensor:
        """Attention sublayer of batch rows b0:b1 from its normalised input `h`: this rank's part of
        the output projection (to be all-reduced)."""
        f, (cos, sin, pos, mask) = self.fns, rope
        kc, vc = L.k_cache[b0:b1], L.v_cache[b0:b1]
        qkv = f.matvec(h, L.wqkv)
        if self._decode_kernel(h.shape[1]):
            y = kernels.decode_attention(qkv, self.cos, self.sin, pos, kc, vc, self.n_heads, self.n_kv,
                                         self.attn_counters, self.tuning).view(h.shape[0], 1, -1)
        else:
            y = f.attend(qkv, kc, vc, cos, sin, pos, mask, self.n_heads, self.n_kv, self.hd)
        return f.matvec(y, L.wo)

    def _mlp(self, L: Layer, h: torch.Tensor) -> torch.Tensor:
        """MLP sublayer from its normalised input `h`: this rank's part of the down projection."""
        f = self.fns
        return f.matvec(f.swiglu_up(h, L.w13, self.inter), L.w2)

    def _next_weight(self, li: int, sub: int) -> torch.Tensor | None:
        """The weight the GEMM right after sublayer `sub` (0 attn, 1 mlp) of layer `li` reads."""
        if sub == 0:
            return self.layers[li].w13
        return self.layers[li + 1].wqkv if li + 1 < len(self.layers) else self.lm_head

    def _next_norm(self, li: int, sub: int) -> torch.Tensor:
        """The RMSNorm weight applied right after sublayer `sub` of layer `li`'s all-reduce."""
        if sub == 0:
            return self.layers[li].ffn_norm
        return self.layers[li + 1].attn_norm if li + 1 < len(self.layers) else self.norm

    def hidden(self, tokens: torch.Tensor, pos: torch.Tensor, chunks: list[tuple[int, int, int, int]]) -> list:
        """Run all layers over `chunks` = [(b0, b1, s0, s1)] of (batch, sequence) ranges. Per chunk
        returns (residual stream x, last all-reduced output d, final normalised h): either h is given
        (the last all-reduce was fused with the final norm) or norm(x + d) is the last hidden state.

        Each sublayer: add the previous all-reduced output and RMSNorm, the sublayer's GEMMs, then the
        all-reduce of this rank's part. In one chunk the all-reduce and the next add+RMSNorm are one
        kernel where Comm allows it (decode). With more than one chunk (pipeline mode) each chunk's
        all-reduce runs on a communication stream while the next chunk's GEMMs run (Domino/NanoFlow
        for batches, ISO for prefill chunks)."""
        sm, f, eps = self.streams, self.fns, self.cfg.rms_norm_eps
        xs = [self.embed[tokens[b0:b1, s0:s1]] for (b0, b1, s0, s1) in chunks]
        ds: list = [None] * len(chunks)  # each chunk's all-reduced sublayer output, not yet added
        hs: list = [None] * len(chunks)  # each chunk's next normalised input, where the all-reduce made it
        ropes = [self._rope_and_mask(pos[s0:s1]) for (_, _, s0, s1) in chunks]
        pending: list = [None] * len(chunks)  # event of each chunk's in-flight all-reduce
        keep = []  # tensors used across streams stay alive until the step joins
        for li, L in enumerate(self.layers):
            for sub in (0, 1):
                norm_in, norm_out = (L.attn_norm, L.ffn_norm) if sub == 0 else (L.ffn_norm, self._next_norm(li, 1))
                for ci, (b0, b1, _, _) in enumerate(chunks):
                    sm.wait(pending[ci])
                    h = hs[ci]
                    if h is None:
                        xs[ci], h = f.norm(xs[ci], ds[ci], norm_in, eps)
                    part = self._attn(L, h, ropes[ci], b0, b1) if sub == 0 else self._mlp(L, h)
                    nxt = self._next_weight(li, sub)
                    if len(chunks) == 1:
                        sm.prefetch(nxt)
                        if self.comm.fused_reason(part, xs[ci], norm_out) is None:
                            (xs[ci], hs[ci]), ds[ci] = self.comm.all_reduce_add_norm(part, xs[ci], norm_out, eps), None
                        else:
                            ds[ci], hs[ci] = self.comm.all_reduce(part), None
                        continue
                    ready = sm.event()
                    with sm.on(sm.comm_stream(ci)):
                        sm.wait(ready)
                        if ci == len(chunks) - 1:
                            sm.prefetch(nxt)
                        ds[ci] = self.comm.all_reduce(part, slot=ci)
                        pending[ci] = sm.event()
                    keep.append((part, ds[ci]))
        for ci in range(len(chunks)):
            sm.wait(pending[ci])
        sm.join()
        return list(zip(xs, ds, hs))

    def _final(self, x, d, h) -> torch.Tensor:
        """The normalised last hidden state: given by a fused all-reduce, or norm(x + d) now."""
        return h if h is not None else self.fns.norm(x, d, self.norm, self.cfg.rms_norm_eps)[1]

    def forward_next(self, tokens: torch.Tensor, pos: torch.Tensor, chunks) -> torch.Tensor:
        """Greedy next token per sequence after `tokens` at positions `pos` (prefill or decode)."""
        val, idx = self.fns.greedy(self.head_local(tokens, pos, chunks))
        offset = self.rank * self.vocab_local
        return self.comm.argmax(val, idx + offset if offset else idx)

    def head_local(self, tokens: torch.Tensor, pos: torch.Tensor, chunks) -> torch.Tensor:
        """This rank's vocabulary shard of the logits at each sequence's last position [B, V / TP],
        through the overlap schedule of `chunks`: what `forward_next` samples from, and what the
        overlap modes' logits check (Runner.step_logits) gathers."""
        outs = self.hidden(tokens, pos, chunks)
        # The last position of each batch range: with sequence chunks only the last chunk has it.
        lasts = {}
        for (b0, _, _, s1), (x, d, h) in zip(chunks, outs):
            if s1 == tokens.shape[1]:
                lasts[b0] = self._final(x[:, -1], None if d is None else d[:, -1], None if h is None else h[:, -1])
        h = torch.cat([lasts[k] for k in sorted(lasts)], dim=0) if len(lasts) > 1 else next(iter(lasts.values()))
        return self.fns.matvec(h, self.lm_head)

    def full_logits(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """All-position, all-vocab logits (correctness tests)."""
        ((x, d, h),) = self.hidden(tokens, pos, [(0, tokens.shape[0], 0, tokens.shape[1])])
        return self.comm.gather_logits(self.fns.matvec(self._final(x, d, h), self.lm_head))
