"""The DeepSeek-V3-family forward pass on the project's own kernels, for verification (prefill, every position)
and for generation (prefill, then one token per step on a KV cache).

``run_model`` reads weights straight from a ``Checkpoint`` (HF folder or model-parallel shards, FP8 with scales or
BF16), resident or streamed one layer at a time, on one process or tensor-parallel under ``torchrun``
(``parallel.py``), and returns float32 logits for every position of every prompt.

Semantics (where the upstream demo and transformers differ, this follows transformers' ``DeepseekV3ForCausalLM``):
- The router runs in f32 (``sigmoid`` + ``e_score_correction_bias`` for choice, group score = sum of the top-2
  biased scores, dropped groups masked with -inf, weights = unbiased scores of the chosen experts, normalized when
  ``norm_topk_prob``, times ``routed_scaling_factor``). V2-style configs: softmax, no bias, ``greedy`` or
  ``group_limited_greedy`` (group score = max), weights not normalized (transformers' V2 router ignores
  ``norm_topk_prob``).
- RMSNorm in f32. YaRN is applied whenever the config has it (the demo only beyond 4096 tokens): interleaved pairs
  ``(x[2i], x[2i+1])``, cos/sin times transformers' ``attention_factor`` (``mscale(factor, mscale) /
  mscale(factor, mscale_all_dim)``, or ``mscale(factor)`` when either is unset), softmax scale ``qk_head_dim ** -0.5``
  times ``mscale(factor, mscale_all_dim) ** 2``. The rotated halves come out de-interleaved (as transformers lays
  them out); q and k share the permutation, so attention scores are unchanged.
- Attention is computed non-absorbed (``kv_b`` expanded per head), causal, softmax in f32; logits of every position.
- FP8 weights: with ``gemm="bf16"`` each is first dequantized exactly as ``cast fp8-bf16`` does
  (``bf16(f32(w) * s)``) and then used in the compute dtype, so an FP8 checkpoint and its BF16 cast give identical
  logits. With ``gemm="fp8"`` activations are quantized per token per 128 channels (``act_quant``, the checkpoint's
  ``scale_fmt``) and multiplied by the block-scaled FP8 weights with f32 accumulation (``fp8_gemm``), as the
  demo does. Unquantized weights (embedding, router, head, norms, a BF16 ``eh_proj``) always use the compute dtype.
- Teacher forcing (``forward(teacher=...)``, ``run_layer``): a layer run on given hidden states (another run's
  inputs of that layer) instead of the previous layer's output, so that its error can be measured alone; in the
  same arithmetic and batch it reproduces that run's output bit for bit.
- MTP (``mtp=True``, the first MTP layer): for position t, ``eh_proj(cat(enorm(embed(token[t+1])),
  hnorm(h[t])))`` with ``h`` the main model's final-normed hidden state (the state vLLM passes to its DeepSeek MTP
  module; some ports pass the state before the final norm instead: a convention, the same on both sides of a
  verification), one decoder block at positions 0..T-2, then ``shared_head.norm`` and ``shared_head.head``: logits
  for token t+2. The MTP layer's own ``embed_tokens`` is used when present, else the model's.
- Tensor parallel (``parallel.py``): the demo's split of every weight, from the rank's own MP shard file; from a HF
  folder under a process group each rank slices what it needs out of the whole tensors (correct, not economical).
- V3.2's sparse-attention indexer selects every earlier token while a prompt is at most ``index_topk`` tokens long,
  so there attention is dense and the indexer weights are not read; longer prompts are refused.
- Generation (``Model.new_cache``, ``prefill``, ``decode``; resident weights): the cache holds, per layer and
  position, the normed latent and the rotated shared rope key (``KVCache``). Prefill is the forward pass above and
  also writes those rows; a decode step computes one token per sequence in the absorbed form (``q_nope`` through
  ``kv_b``'s key part, scores and the weighted sum over the cached latent, ``kv_b``'s value part after), the same
  function reassociated: float32 logits agree with a full forward pass to rounding (~1e-6 relative). FP8 ``kv_b``
  is dequantized once for it when the FP8 GEMM path keeps the other weights FP8. ``decode(static=True)`` has fixed
  shapes and no host sync, as a CUDA graph needs: the chosen experts through one grouped kernel
  (``kernels/moe_gemm.py``) when the experts are stacked, else every local expert on every row (the chosen outputs
  kept). Eagerly (prefill, ``forward``) the routed experts run sorted by expert, the counts read once per layer.
- Batch invariance (Triton engine; on by default, ``BATCH_INVARIANT``, off with ``load_model(batch_invariant=False)``):
  every decode step runs on ``kernels/rowwise.py`` (GEMMs, RMSNorm, the absorbed attention, the experts' weighted
  sum) and the grouped experts kernel with a fixed row tile, whose result for a row does not depend on how many rows
  the step has, nor on the attended length beyond the row's own position. So a sequence decodes to the same bits
  alone or in any batch, and speculative decoding's two rows per sequence give plain decoding's logits. Prefill and
  ``forward`` keep cuBLAS and torch's reductions (their results need only agree to rounding).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import names as N
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, MissingTensorError, ShardingError
from .parallel import Group, check_degree, current_group, local_slice
from .runtime import rank_device

# Decode on the batch-invariant kernels unless asked otherwise (Triton engine): a sequence's tokens do not depend on
# its batch, and speculative decoding gives plain greedy's tokens in bfloat16 too. Checked under Triton's interpreter
# (tests/test_kernels.py) and on the H100 (tests/test_gpu.py); their speed against cuBLAS: docs/benchmarks.md.
BATCH_INVARIANT = True

OnLayer = Callable[[int, list[torch.Tensor]], None]
# Teacher forcing: ``teacher(L, run)`` is called while layer L's weights are loaded; ``run(hidden)`` applies that layer
# to other hidden states (one [T_i, H] tensor per prompt, the prompts' lengths) and returns its outputs (float32,
# CPU). For the MTP layer, ``run`` maps the main model's final hidden states to the MTP module's logits.
LayerFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]
Teacher = Callable[[int, LayerFn], None]


@dataclass
class ModelOutput:
    """Float32 CPU logits for every position of every prompt (and the MTP module's, when asked)."""

    logits: list[torch.Tensor]  # [T_i, vocab]
    mtp_logits: list[torch.Tensor] | None = None  # [T_i - 1, vocab]: position t predicts token t + 2


# ---------------------------------------------------------------------- kernels by engine
class Ops:
    """The three FP8 kernels, from Triton (``engine="triton"``) or their plain-torch references."""

    def __init__(self, engine: str):
        if engine == "triton":
            from .kernels.act_quant import act_quant
            from .kernels.fp8_gemm import fp8_gemm
            from .kernels.weight_dequant import weight_dequant
        elif engine == "torch":
            from .kernels.act_quant import act_quant_ref as act_quant
            from .kernels.fp8_gemm import fp8_gemm_ref as fp8_gemm
            from .kernels.weight_dequant import weight_dequant_ref as weight_dequant
        else:
            raise ConfigError(f"engine must be 'triton' or 'torch', got {engine!r}")
        self.act_quant, self.fp8_gemm, self.weight_dequant = act_quant, fp8_gemm, weight_dequant


class Linear:
    """``y = x @ W.T``: W dense in the compute dtype, or FP8 + block scales for the FP8 GEMM path."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None, env: Env):
        self.env = env
        if scale is not None and env.gemm == "bf16":
            w, scale = env.ops.weight_dequant(w, scale.float(), env.block), None  # exactly as cast does
        if scale is None:
            self.w, self.s = w.to(env.dtype), None
        else:
            self.w, self.s = w, scale.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.env
        if self.s is None:
            return e.matmul(x.to(self.w.dtype), self.w)
        xq, xs = e.ops.act_quant(x, e.block[1], e.scale_fmt)
        if e.invariant:  # one tile configuration whatever the row count (kernels/rowwise.py)
            from .kernels.rowwise import fp8_config

            return e.ops.fp8_gemm(xq, xs, self.w, self.s, e.dtype, e.block, fp8_config(*self.w.shape, self.w.device))
        return e.ops.fp8_gemm(xq, xs, self.w, self.s, e.dtype, e.block)


@dataclass
class Env:
    """Everything a layer needs besides its weights."""

    ck: Checkpoint
    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    gemm: str
    ops: Ops
    group: Group
    block: tuple[int, int]
    scale_fmt: str | None
    # Decode steps run the chosen routed experts through the grouped kernel (kernels/moe_gemm.py): Triton engine,
    # dense (BF16) expert weights.
    grouped_moe: bool = False
    # Decode steps run the batch-invariant kernels (kernels/rowwise.py; Triton engine): ``invariant_decode`` is the
    # choice made at load, ``invariant`` is on only while a decode step runs (``decoding``).
    invariant_decode: bool = False
    invariant: bool = False
    # Streaming reads ahead: host copies of the next layer's tensors, read by one background thread.
    prefetched: dict[str, Future] = field(default_factory=dict, repr=False)
    reader: ThreadPoolExecutor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ the step's arithmetic
    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Within: a decode step, on the batch-invariant kernels when the model was loaded with them."""
        before, self.invariant = self.invariant, self.invariant_decode
        try:
            yield
        finally:
            self.invariant = before

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` (same dtypes): batch-invariant within a decode step, else ``F.linear`` (cuBLAS)."""
        if self.invariant:
            from .kernels.rowwise import matmul

            return matmul(x, w)
        return F.linear(x, w)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``rms_norm`` with the config's epsilon: one program per row within a decode step."""
        if self.invariant:
            from .kernels.rowwise import rms_norm as rows_rms_norm

            return rows_rms_norm(x, w, self.cfg.rms_norm_eps)
        return rms_norm(x, w, self.cfg.rms_norm_eps)

    # ------------------------------------------------------------------ reading this rank's weights
    @functools.cached_property
    def names_by_layer(self) -> dict[int | None, list[str]]:
        """The checkpoint's tensor names grouped by layer (None: top-level), parsed once per model."""
        out: dict[int | None, list[str]] = {}
        for name in self.ck.tensors:
            out.setdefault(N.parse_hf(name).layer, []).append(name)
        return out

    def prefetch(self, names: list[str]) -> None:
        """Start reading ``names`` (host side) in the background; ``read`` takes them when asked."""
        if self.reader is None:
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="dsv3-prefetch")
        for n in names:
            if n not in self.prefetched and self.has(n):
                self.prefetched[n] = self.reader.submit(self._read_host, n)

    def drop_prefetched(self) -> None:
        """Forget what was read ahead but not used (waits for in-flight reads so none outlives the forward)."""
        for f in self.prefetched.values():
            f.result()
        self.prefetched.clear()

    def has(self, name: str) -> bool:
        if self.ck.layout == "mp" and self.group.active:
            return any(p.rank == self.group.rank for p in self.ck.mp_parts.get(name, ()))
        return name in self.ck.tensors

    def read(self, name: str) -> torch.Tensor:
        """This rank's piece of a tensor (the whole tensor on one process), on the device."""
        fut = self.prefetched.pop(name, None)
        t = fut.result() if fut is not None else self._read_host(name)
        return t.to(self.device)

    def _read_host(self, name: str) -> torch.Tensor:
        ck, g = self.ck, self.group
        if not g.active:
            t = ck.read(name)
        elif ck.layout == "mp":
            part = next((p for p in ck.mp_parts.get(name, ()) if p.rank == g.rank), None)
            if part is None:
                raise MissingTensorError(f"not in rank {g.rank}'s file", tensor=name)
            t = ck.read_info(part.info)
        else:
            t = self._slice(name, ck.read(name))
        return t

    def _slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole tensor from a HF folder (tensor parallel without MP shards)."""
        n = N.parse_hf(name)
        if not isinstance(n.split, int):
            return t
        size = t.shape[n.split]
        if size % self.group.world:
            raise ShardingError(f"{name}: dim {n.split} of size {size} does not split over {self.group.world} ranks")
        if n.is_scale:
            blk = self.block[n.split]
            full = self.ck.tensors[n.weight_name].shape[n.split]
            if (full // self.group.world) % blk:
                raise ShardingError(
                    f"{name}: per-rank size {full // self.group.world} is not a multiple of the {blk} block"
                )
        lo, hi = local_slice(size, self.group)
        return t.narrow(n.split, lo, hi - lo).contiguous()

    def linear(self, weight: str) -> Linear:
        scale = N.scale_name(weight)
        w = self.read(weight)
        if w.dtype == torch.float8_e4m3fn:
            if not self.has(scale):
                raise CheckpointError("FP8 weight without its weight_scale_inv", tensor=weight)
            return Linear(w, self.read(scale), self)
        if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"unsupported weight dtype {w.dtype}", tensor=weight)
        return Linear(w, None, self)

    def norm(self, weight: str) -> torch.Tensor:
        return self.read(weight).float()


# ---------------------------------------------------------------------- math
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w * y).to(x.dtype)


def _mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for the given positions (YaRN when configured), in f32."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv = 1.0 / pos_freqs
    attn_factor = 1.0
    rs = cfg.rope_scaling
    if rs is not None and rs.factor > 1:

        def corr_dim(rot: float) -> float:
            return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(rs.beta_fast)), 0)
        high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp  # 1: keep the original frequency; 0: divide it by factor
        inv = (1.0 / (rs.factor * pos_freqs)) * (1 - extrap) + inv * extrap
        if rs.mscale and rs.mscale_all_dim:
            attn_factor = _mscale(rs.factor, rs.mscale) / _mscale(rs.factor, rs.mscale_all_dim)
        else:
            attn_factor = _mscale(rs.factor)
    freqs = positions.float()[:, None] * inv[None, :]
    return freqs.cos() * attn_factor, freqs.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of ``x`` [T, heads, d]; output halves de-interleaved."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """The decoding cache, allocated once: for every main layer, batch slot and position, MLA's compact latent
    after ``kv_a_layernorm`` (``kv_lora_rank`` values) and the rotated shared rope key (``qk_rope_head_dim``):
    ``data`` [layers, batch, max_len, kv_lora_rank + rope dims] in the compute dtype (576 values per token and layer
    on V3, instead of heads x (192 + 128) for expanded keys and values). ``cos``/``sin`` [max_len, rope dims / 2]
    hold the rope tables of every position, so a step reads them on the device."""

    data: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def batch(self) -> int:
        return self.data.shape[1]

    @property
    def max_len(self) -> int:
        return self.data.shape[2]


@dataclass
class Step:
    """What a decoding step needs besides the tokens (built on the device from ``positions``, no host sync)."""

    cache: KVCache
    positions: torch.Tensor  # [B] position of each sequence's new token
    rows: torch.Tensor  # [B] the cache slot of each token: 0 .. B-1, or repeated (several tokens of a sequence)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, rope dims / 2]
    mask: torch.Tensor  # [B, kv_len] True where a cached position lies after the new token (not attended)
    kv_len: int  # cached positions attended to (max_len for a CUDA graph: static shapes)
    static: bool  # fixed shapes and no host sync (CUDA graph capture)
    contiguous: bool = True  # rows are 0 .. B-1 (the cache's first B slots are read as a view, not gathered)


class Layer:
    """One decoder block's weights (this rank's pieces), read on construction."""

    def __init__(self, env: Env, L: int):
        cfg, p = env.cfg, f"model.layers.{L}."
        self.env, self.L = env, L
        self.absorbed: tuple[torch.Tensor, torch.Tensor] | None = None  # kv_b's key and value parts (decode)
        self.grouped: tuple[torch.Tensor, torch.Tensor] | None = None  # routed experts stacked for moe_gemm (decode)
        self.attn_norm = env.norm(p + "input_layernorm.weight")
        self.ffn_norm = env.norm(p + "post_attention_layernorm.weight")
        if cfg.has_q_lora:
            self.wq_a = env.linear(p + "self_attn.q_a_proj.weight")
            self.q_norm = env.norm(p + "self_attn.q_a_layernorm.weight")
            self.wq_b = env.linear(p + "self_attn.q_b_proj.weight")
        else:
            self.wq = env.linear(p + "self_attn.q_proj.weight")
        self.wkv_a = env.linear(p + "self_attn.kv_a_proj_with_mqa.weight")
        self.kv_norm = env.norm(p + "self_attn.kv_a_layernorm.weight")
        self.wkv_b = env.linear(p + "self_attn.kv_b_proj.weight")
        self.wo = env.linear(p + "self_attn.o_proj.weight")
        self.moe = cfg.is_moe_layer(L)
        if self.moe:
            self.gate = env.read(p + "mlp.gate.weight").float()
            self.bias = env.read(p + "mlp.gate.e_score_correction_bias").float() if cfg.has_router_bias else None
            self.experts = {
                e: tuple(env.linear(p + f"mlp.experts.{e}.{m}.weight") for m in ("gate_proj", "up_proj", "down_proj"))
                for e in N.local_experts(cfg, env.group.rank, env.group.world)
            }
            self.shared = (
                tuple(env.linear(p + f"mlp.shared_experts.{m}.weight") for m in ("gate_proj", "up_proj", "down_proj"))
                if cfg.n_shared_experts
                else None
            )
        else:
            self.mlp = tuple(env.linear(p + f"mlp.{m}.weight") for m in ("gate_proj", "up_proj", "down_proj"))

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        x: torch.Tensor,
        lens: list[int],
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[KVCache, list[int]] | None = None,
    ) -> torch.Tensor:
        """``x`` [sum(lens), H]: the prompts' tokens concatenated; attention stays within each prompt. With ``kv``
        (a cache and one slot per prompt), each prompt's latent and rope key are also written to its slot."""
        eps = self.env.cfg.rms_norm_eps
        x = x + self.attention(rms_norm(x, self.attn_norm, eps), lens, rope, kv)
        return x + self.ffn(rms_norm(x, self.ffn_norm, eps))

    def ffn(self, h: torch.Tensor, static: bool = False) -> torch.Tensor:
        return self.moe_ffn(h, static) if self.moe else self.env.group.all_reduce(_mlp(self.mlp, h))

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.env.cfg
        q = self.wq_b(self.env.rms(self.wq_a(x), self.q_norm)) if cfg.has_q_lora else self.wq(x)
        return q.view(x.shape[0], -1, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)

    def _latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed latent [n, kv_lora_rank] and the unrotated shared rope key [n, rope dims]."""
        cfg = self.env.cfg
        latent, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return self.env.rms(latent, self.kv_norm), k_pe

    def attention(
        self,
        x: torch.Tensor,
        lens: list[int],
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[KVCache, list[int]] | None = None,
    ) -> torch.Tensor:
        cfg, env = self.env.cfg, self.env
        nope, rd, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        nh = cfg.num_attention_heads // env.group.world
        q = self._q(x)
        latent, k_pe = self._latent(x)
        kvb = self.wkv_b(latent).view(-1, nh, nope + vd)
        k_nope, v = kvb.split([nope, vd], dim=-1)
        cos, sin = rope
        q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin)
        if kv is not None:
            cache, slots = kv
            rows = torch.cat([latent, k_pe[:, 0]], dim=-1)
            for sl, slot in zip(_slices(lens), slots):
                cache.data[self.L, slot, : sl.stop - sl.start] = rows[sl]
        k = torch.cat([k_nope, k_pe.expand(-1, nh, rd)], dim=-1)
        out = torch.empty((x.shape[0], nh, vd), dtype=x.dtype, device=x.device)
        for sl in _slices(lens):
            out[sl] = _causal_attention(q[sl], k[sl], v[sl], cfg.softmax_scale)
        return env.group.all_reduce(self.wo(out.reshape(x.shape[0], nh * vd)))

    # ------------------------------------------------------------------ one decoding step
    def prepare_decode(self) -> None:
        """``kv_b`` split per head into its key and value parts, for the absorbed attention: the layer's dense
        weight when it has one, else dequantized once here (never again per step)."""
        cfg, env = self.env.cfg, self.env
        w = self.wkv_b.w if self.wkv_b.s is None else env.ops.weight_dequant(self.wkv_b.w, self.wkv_b.s, env.block)
        w = w.to(env.dtype).view(cfg.num_attention_heads // env.group.world, -1, cfg.kv_lora_rank)
        self.absorbed = (w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :])
        if self.moe and env.grouped_moe and self.experts:
            self._stack_experts()

    def _stack_experts(self) -> None:
        """The local experts' dense weights as two stacks, ``[E, 2I, H]`` (gate and up) and ``[E, H, I]`` (down),
        for ``moe_gemm``; each expert's ``Linear`` then holds views of them (no second copy)."""
        mlps = list(self.experts.values())
        w13 = torch.stack([torch.cat([g.w, u.w]) for g, u, _ in mlps])
        for (g, u, _), stacked in zip(mlps, w13):
            g.w, u.w = stacked[: g.w.shape[0]], stacked[g.w.shape[0] :]
        w2 = torch.stack([d.w for _, _, d in mlps])
        for (_, _, d), stacked in zip(mlps, w2):
            d.w = stacked
        self.grouped = (w13, w2)

    def decode(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """One new token per sequence: ``x`` [B, H] at ``step.positions``; writes this token's cache row."""
        env = self.env
        x = x + self.absorbed_attention(env.rms(x, self.attn_norm), step)
        return x + self.ffn(env.rms(x, self.ffn_norm), step.static)

    def absorbed_attention(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """MLA over the cached latent: ``q_nope`` goes through ``kv_b``'s key part, scores are taken against the
        latent (plus the rope part against the cached rope key), the weighted latent goes through ``kv_b``'s value
        part. The same function as ``attention`` (the products are only reassociated)."""
        cfg, env = self.env.cfg, self.env
        nope, kvr = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        B = x.shape[0]
        q = self._q(x)
        latent, k_pe = self._latent(x)
        cos, sin = step.rope
        q_pe = apply_rope(q[..., nope:], cos, sin)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin)[:, 0]
        c = step.cache.data[self.L]
        c[step.rows, step.positions] = torch.cat([latent, k_pe], dim=-1)  # every token's row, then attention
        w_k, w_v = self.absorbed
        if env.invariant:  # each row over its own positions only, the same bits whatever the batch
            from .kernels.rowwise import matmul, mla_decode

            q_lat = torch.empty((B, w_k.shape[0], kvr), dtype=x.dtype, device=x.device)
            matmul(q[..., :nope].transpose(0, 1), w_k.transpose(1, 2), out=q_lat.transpose(0, 1))
            o = mla_decode(q_lat, q_pe.contiguous(), c, step.rows, step.positions, cfg.softmax_scale)
            out = torch.empty((B, w_v.shape[0], w_v.shape[1]), dtype=x.dtype, device=x.device)
            matmul(o.transpose(0, 1), w_v, out=out.transpose(0, 1))
            return env.group.all_reduce(self.wo(out.reshape(B, -1)))
        c = c[:B, : step.kv_len] if step.contiguous else c[step.rows, : step.kv_len]
        q_lat = torch.einsum("bhd,hdc->bhc", q[..., :nope], w_k)
        s = torch.einsum("bhc,bsc->bhs", q_lat, c[..., :kvr]) + torch.einsum("bhr,bsr->bhs", q_pe, c[..., kvr:])
        s = s.float().mul_(cfg.softmax_scale).masked_fill_(step.mask[:, None, :], -math.inf)
        o = torch.einsum("bhs,bsc->bhc", s.softmax(dim=-1).to(x.dtype), c[..., :kvr])
        o = torch.einsum("bhc,hdc->bhd", o, w_v)
        return env.group.all_reduce(self.wo(o.reshape(B, -1)))

    def _grouped_experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The chosen experts of every row through ``moe_gemm``: one launch for gate and up, one for down."""
        from .kernels.moe_gemm import moe_gemm

        env = self.env
        inv = env.invariant
        B, k = idx.shape
        first = min(self.experts)
        local = idx - first
        mine = (local >= 0) & (local < len(self.experts))  # under tensor parallelism, other ranks' experts give 0
        pairs = torch.where(mine, local, torch.zeros_like(local)).reshape(-1)
        xs = x.repeat_interleave(k, dim=0)
        w13, w2 = self.grouped
        gu = moe_gemm(xs, w13, None, pairs, env.block, max_per_expert=B, invariant=inv)
        g, u = gu.split(w13.shape[1] // 2, dim=-1)
        out = moe_gemm(F.silu(g) * u, w2, None, pairs, env.block, max_per_expert=B, invariant=inv).view(B, k, -1)
        return self._choice_sum(out, torch.where(mine, w, torch.zeros_like(w)))

    def _choice_sum(self, out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The ``top_k`` expert outputs of each row [n, k, H] weighted by ``w`` [n, k] and summed in choice order."""
        if self.env.invariant:
            from .kernels.rowwise import choice_sum

            return choice_sum(out, w)
        return (out * w[..., None].to(out.dtype)).sum(1)

    def _sorted_experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The chosen experts of every row, each expert on all of its rows at once: the (row, choice) pairs sorted
        by expert, one read of the counts per layer (not one host synchronization per expert), each pair's output
        put back in place and weighted, the ``top_k`` outputs of a row summed in choice order (deterministic: no
        atomic scatter)."""
        from .kernels.moe_gemm import route  # (plain torch: the pairs sorted by expert, as the grouped kernel takes)

        n, k = idx.shape
        order, _, counts = route(idx, self.env.cfg.n_routed_experts)
        order, counts = order.long(), counts.tolist()
        xs = x[order // k]
        out = torch.zeros((n * k, x.shape[1]), dtype=x.dtype, device=x.device)
        start = 0
        for e, c in enumerate(counts):
            if c and e in self.experts:  # (under tensor parallelism other ranks' experts stay zero here)
                sel = order[start : start + c]
                out[sel] = _mlp(self.experts[e], xs[start : start + c])
            start += c
        return self._choice_sum(out.view(n, k, -1), w)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert indices, weights) [n, top_k], in f32."""
        cfg = self.env.cfg
        logits = self.env.matmul(x.float(), self.gate)
        E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.bias if self.bias is not None else scores
            if G > 1:
                gs = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
                choice = _mask_groups(choice, gs, cfg.topk_group, G)
            idx = choice.topk(k, dim=-1)[1]
            w = scores.gather(1, idx)
            if cfg.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            if cfg.topk_method == "group_limited_greedy" and G > 1:
                gs = scores.view(-1, G, E // G).amax(-1)
                scores = _mask_groups(scores, gs, cfg.topk_group, G, fill=0.0)
            w, idx = scores.topk(k, dim=-1)
        return idx, w * cfg.routed_scaling_factor

    def moe_ffn(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Routed experts (only those chosen, reading which ones from the device), plus the shared experts. With
        ``static`` (fixed shapes, no host synchronization, as a CUDA graph needs): the grouped kernel when the
        experts are stacked (each chosen expert's weights read once), else every local expert on every row, each
        row's chosen outputs then weighted and summed (the same sum as the eager path's)."""
        idx, w = self.route(x)
        y = torch.zeros_like(x)
        if self.grouped is not None and (static or self.env.invariant):
            y = self._grouped_experts(x, idx, w)
        elif static:  # every local expert on every row; each row's chosen outputs summed as the eager path sums them
            first, n = min(self.experts), x.shape[0]
            outs = torch.stack([_mlp(self.experts[e], x) for e in sorted(self.experts)])  # [local experts, n, H]
            local = idx - first
            mine = (local >= 0) & (local < len(self.experts))  # under tensor parallelism, other ranks' experts give 0
            chosen = outs[torch.where(mine, local, torch.zeros_like(local)), torch.arange(n, device=x.device)[:, None]]
            y = self._choice_sum(chosen, torch.where(mine, w, torch.zeros_like(w)))
        else:
            y = self._sorted_experts(x, idx, w)
        if self.shared is not None:
            y = y + _mlp(self.shared, x)
        return self.env.group.all_reduce(y)


def _mask_groups(
    s: torch.Tensor, group_scores: torch.Tensor, keep: int, G: int, fill: float = -math.inf
) -> torch.Tensor:
    top = group_scores.topk(keep, dim=-1)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
    return s.masked_fill(~mask.repeat_interleave(s.shape[-1] // G, dim=-1), fill)


def _mlp(m: tuple[Linear, Linear, Linear], x: torch.Tensor) -> torch.Tensor:
    gate, up, down = m
    return down(F.silu(gate(x)) * up(x))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, h, d] each; softmax in f32 (on CUDA: the fused scaled-dot-product attention, which never holds the
    [h, T, T] scores in memory).

    On CUDA the inputs go in four-dimensional (the fused kernels accept no other rank: a 3-D call silently takes the
    unfused path that materializes the scores), and ``v`` is zero-padded to the key's head size (MLA: 128 against
    192), which the flash kernel requires; the padded columns of the output are zeros and are dropped."""
    if q.is_cuda:
        dv = v.shape[-1]
        if dv != q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale
        )
        return o[0, ..., :dv].transpose(0, 1)
    T = q.shape[0]
    s = torch.einsum("thd,shd->hts", q, k).float() * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    p = s.softmax(dim=-1).to(v.dtype)
    return torch.einsum("hts,shd->thd", p, v)


# ---------------------------------------------------------------------- top level
class Embedding:
    def __init__(self, env: Env, name: str):
        self.env = env
        self.w = env.read(name).to(env.dtype)
        self.lo, self.hi = local_slice(env.cfg.vocab_size, env.group) if env.group.active else (0, env.cfg.vocab_size)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.env.group.active:
            return self.w[tokens]
        inside = (tokens >= self.lo) & (tokens < self.hi)
        h = self.w[(tokens - self.lo).clamp(0, self.hi - self.lo - 1)] * inside[:, None].to(self.w.dtype)
        return self.env.group.all_reduce(h)


class Head:
    def __init__(self, env: Env, norm: str, head: str):
        self.env = env
        self.norm = env.norm(norm)
        self.w = env.read(head).to(env.dtype)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = self.env.rms(h, self.norm)
        return self.env.group.gather_last(self.env.matmul(x, self.w)).float()


def _check_prompts(cfg: ModelConfig, prompts: list[list[int]]) -> None:
    if not prompts:
        raise ConfigError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if cfg.has_indexer and len(p) > cfg.index_topk:
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens; sparse attention beyond index_topk={cfg.index_topk} is not modelled"
            )


class Model:
    """The model over one checkpoint: weights resident (``load_model``) or read layer by layer at each forward."""

    def __init__(self, env: Env, resident: bool):
        self.env = env
        self.layers: list[Layer] | None = None
        self.head: Head | None = None
        self.embed: Embedding | None = None
        self.drafter: MtpDraft | None = None  # the MTP module for speculative decoding (load_drafter)
        if resident:
            with torch.inference_mode():
                self.embed = Embedding(env, "model.embed_tokens.weight")
                self.layers = [Layer(env, L) for L in env.cfg.main_layers]
                self.head = Head(env, "model.norm.weight", "lm_head.weight")

    def forward(
        self,
        prompts: list[list[int]],
        *,
        mtp: bool = False,
        on_layer: OnLayer | None = None,
        teacher: Teacher | None = None,
    ) -> ModelOutput:
        """Logits of every position; ``on_layer(L, hidden)`` hears each layer's output, ``teacher(L, run)`` may run
        each loaded layer on other inputs (see ``Teacher``)."""
        env, cfg = self.env, self.env.cfg
        _check_prompts(cfg, prompts)
        if mtp and not cfg.num_nextn_predict_layers:
            raise ConfigError("mtp=True but the config has no MTP layer (num_nextn_predict_layers = 0)")
        dev = env.device
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(T) for T in lens])
        rope = tuple(t.to(dev) for t in rope_tables(cfg, positions))
        streaming = self.layers is None
        by_layer = env.names_by_layer if streaming else {}
        if streaming:
            env.prefetch(by_layer.get(cfg.main_layers[0], []) if len(cfg.main_layers) else [])
        with torch.inference_mode():
            # Streaming: each piece is read just before it is used and dropped right after; the next layer's bytes
            # are read from disk in the background meanwhile (host memory: at most two layers' raw bytes).
            h = (self.embed or Embedding(env, "model.embed_tokens.weight"))(tokens)
            for L in cfg.main_layers:
                if streaming:
                    nxt = (
                        by_layer.get(L + 1, [])
                        if L + 1 < cfg.num_hidden_layers
                        else ["model.norm.weight", "lm_head.weight"]
                    )
                    env.prefetch(nxt)
                layer = self.layers[L] if self.layers is not None else Layer(env, L)
                h = layer(h, lens, rope)
                if teacher is not None:
                    teacher(L, functools.partial(_apply_layer, layer, lens, rope))
                del layer
                if on_layer is not None:
                    on_layer(L, [t.float().cpu() for t in h.split(lens)])
            logits = (self.head or Head(env, "model.norm.weight", "lm_head.weight"))(h)
            env.drop_prefetched()
            out = ModelOutput([t.cpu() for t in logits.split(lens)])
            if mtp:
                module = Mtp(env, tokens, lens, keep=teacher is not None)
                out.mtp_logits = module(h)
                if teacher is not None:
                    teacher(cfg.num_hidden_layers, lambda hs: module(_stack(env, hs, lens)))
        return out

    def run_layer(self, L: int, prompts: list[list[int]], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Main decoder layer ``L`` applied to ``hidden`` (one [T_i, H] tensor per prompt, at positions 0..T_i-1),
        instead of the previous layer's output: float32 CPU outputs, one per prompt. Reads the layer when the
        model streams."""
        env, cfg = self.env, self.env.cfg
        _check_prompts(cfg, prompts)
        if L not in cfg.main_layers:
            raise ConfigError(f"layer {L} is not a main layer (0..{cfg.num_hidden_layers - 1})")
        lens = [len(p) for p in prompts]
        positions = torch.cat([torch.arange(T) for T in lens])
        rope = tuple(t.to(env.device) for t in rope_tables(cfg, positions))
        with torch.inference_mode():
            layer = self.layers[L] if self.layers is not None else Layer(env, L)
            return _apply_layer(layer, lens, rope, hidden)

    # ------------------------------------------------------------------ generation: prefill, then one token a step
    def _resident(self) -> tuple[Embedding, list[Layer], Head]:
        if self.layers is None or self.embed is None or self.head is None:
            raise ConfigError("generation needs the weights resident (load_model(..., stream=False))")
        return self.embed, self.layers, self.head

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """The decoding cache for ``batch`` sequences of up to ``max_len`` tokens (zeros), and every position's rope
        table; also prepares each layer's absorbed ``kv_b`` once. With the drafter loaded, one more cache layer
        (index ``num_hidden_layers``) holds the MTP module's rows."""
        env, cfg = self.env, self.env.cfg
        _, layers, _ = self._resident()
        blocks = layers + ([self.drafter.layer] if self.drafter is not None else [])
        for layer in blocks:
            if layer.absorbed is None:
                layer.prepare_decode()
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        data = torch.zeros(len(blocks), batch, max_len, width, dtype=env.dtype, device=env.device)
        cos, sin = rope_tables(cfg, torch.arange(max_len))
        return KVCache(data, cos.to(env.device), sin.to(env.device))

    def prefill(
        self, prompts: list[list[int]], cache: KVCache, slots: list[int] | None = None, hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run whole prompts (non-absorbed attention, as ``forward``), write their cache rows from position 0 into
        ``slots`` (default 0, 1, ...), and return float32 logits of each prompt's last position [n, vocab]; with
        ``hidden`` also every position's final hidden state (before the final norm) [sum of lengths, H]."""
        env, cfg = self.env, self.env.cfg
        embed, layers, head = self._resident()
        _check_prompts(cfg, prompts)
        slots = list(range(len(prompts))) if slots is None else list(slots)
        lens = [len(p) for p in prompts]
        if len(slots) != len(prompts) or max(slots) >= cache.batch or max(lens) > cache.max_len:
            raise ConfigError(f"{len(prompts)} prompt(s) of up to {max(lens)} tokens do not fit the cache's "
                              f"{cache.batch} slots of {cache.max_len} positions")  # fmt: skip
        positions = torch.cat([torch.arange(T) for T in lens]).to(env.device)
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=env.device)
        rope = (cache.cos[positions], cache.sin[positions])
        with torch.inference_mode():
            h = embed(tokens)
            for layer in layers:
                h = layer(h, lens, rope, (cache, slots))
            last = torch.tensor([sl.stop - 1 for sl in _slices(lens)], device=env.device)
            return (head(h[last]), h) if hidden else head(h[last])

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int | None = None,
        static: bool = False,
        slots: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One token for each of the first B slots: ``tokens`` and ``positions`` [B] (long, on the device). Writes
        their cache rows, attends over cached positions ``< kv_len`` (default: all), returns float32 logits [B,
        vocab]. Nothing here reads the device from the host, so with ``static`` (and ``kv_len`` left at the cache
        length) a CUDA graph can capture it.

        ``slots`` [B] (speculative decoding): each token's cache slot instead of 0 .. B-1, so that several tokens
        of one sequence (consecutive positions) run in one step; each sees the rows written before it in the step.
        ``hidden``: also return the final hidden states (before the final norm) [B, H]."""
        embed, layers, head = self._resident()
        kv_len = cache.max_len if kv_len is None else kv_len
        B = tokens.shape[0]
        contiguous = slots is None
        rows = torch.arange(B, device=tokens.device) if slots is None else slots
        mask = torch.arange(kv_len, device=tokens.device)[None, :] > positions[:, None]
        rope = (cache.cos[positions], cache.sin[positions])
        step = Step(cache, positions, rows, rope, mask, kv_len, static, contiguous)
        with torch.inference_mode(), self.env.decoding():
            h = embed(tokens)
            for layer in layers:
                h = layer.decode(h, step)
            return (head(h), h) if hidden else head(h)

    # ------------------------------------------------------------------ the MTP module as a drafter
    def load_drafter(self) -> MtpDraft:
        """Read the first MTP module and keep it resident for speculative decoding (``new_cache`` then gives it
        its cache rows); ``ConfigError`` when the checkpoint has none."""
        env, cfg = self.env, self.env.cfg
        embed, _, head = self._resident()
        if cfg.num_nextn_predict_layers < 1 or not env.has(f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"):
            raise ConfigError(
                f"{env.ck.path}: no MTP module (model.layers.{cfg.num_hidden_layers}.*): speculative decoding drafts "
                "with it (cast and shard keep it with --mtp keep)"
            )
        if self.drafter is None:
            with torch.inference_mode():
                self.drafter = MtpDraft(env, embed, head.norm)
        return self.drafter


def load_model(
    ck: Checkpoint,
    *,
    device: str | torch.device = "cpu",
    engine: str = "torch",
    gemm: str = "bf16",
    stream: bool = False,
    dtype: torch.dtype = torch.float32,
    batch_invariant: bool | None = None,
) -> Model:
    """A ``Model`` whose ``forward`` runs prompts; ``stream=False`` reads every main-model weight now.
    ``batch_invariant``: decode steps on ``kernels/rowwise.py`` (Triton engine; default ``BATCH_INVARIANT``)."""
    cfg = ck.config
    if cfg is None:
        raise ConfigError(f"{ck.path}: no model config (config.json)")
    if gemm not in ("bf16", "fp8"):
        raise ConfigError(f"gemm must be 'bf16' or 'fp8', got {gemm!r}")
    group = current_group()
    if group.active:
        check_degree(cfg, group)
        if ck.layout == "mp" and ck.world != group.world:
            raise ShardingError(f"checkpoint is MP-{ck.world} but the process group has {group.world} ranks")
    dev = rank_device(str(device), group.world)
    if engine == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("engine 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use engine 'torch' on CPU")
    env = Env(ck, cfg, dev, dtype, gemm, Ops(engine), group, cfg.block_size, cfg.quant.scale_fmt if cfg.quant else None)
    env.grouped_moe = engine == "triton" and gemm == "bf16"
    if batch_invariant and engine != "triton":
        raise ConfigError("batch-invariant decoding runs the Triton kernels: engine 'triton' (CUDA)")
    env.invariant_decode = engine == "triton" and (BATCH_INVARIANT if batch_invariant is None else batch_invariant)
    return Model(env, resident=not stream)


def run_model(
    ck: Checkpoint,
    prompts: list[list[int]],
    *,
    device: str | torch.device = "cpu",
    engine: str = "torch",
    gemm: str = "bf16",
    stream: bool = True,
    mtp: bool = False,
    on_layer: OnLayer | None = None,
    dtype: torch.dtype = torch.float32,
    teacher: Teacher | None = None,
) -> ModelOutput:
    """Logits for every position of every prompt (see the module docstring for the exact semantics).

    ``stream=True`` reads each layer just before it runs and frees it after (peak: one layer plus activations);
    ``stream=False`` reads everything first; both give identical logits. Under an initialized process group of
    N ranks with an MP-N checkpoint, each rank reads only its own file and every rank returns the full logits.
    """
    if ck.config is not None:
        _check_prompts(ck.config, prompts)  # before reading any weight
    model = load_model(ck, device=device, engine=engine, gemm=gemm, stream=stream, dtype=dtype)
    return model.forward(prompts, mtp=mtp, on_layer=on_layer, teacher=teacher)


def _stack(env: Env, hidden: list[torch.Tensor], lens: list[int]) -> torch.Tensor:
    """Per-prompt hidden states [T_i, H] as the model's concatenated residual stream (device, compute dtype)."""
    if [int(t.shape[0]) for t in hidden] != lens:
        raise ConfigError(f"hidden states of {[int(t.shape[0]) for t in hidden]} positions for prompts of {lens}")
    return torch.cat(list(hidden)).to(env.device, env.dtype)


def _apply_layer(
    layer: Layer, lens: list[int], rope: tuple[torch.Tensor, torch.Tensor], hidden: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``layer`` on given per-prompt hidden states (teacher forcing): float32 CPU outputs, one per prompt."""
    with torch.inference_mode():
        y = layer(_stack(layer.env, hidden, lens), lens, rope)
    return [t.float().cpu() for t in y.split(lens)]


def mtp_input(
    e: torch.Tensor, h: torch.Tensor, final_norm: torch.Tensor, hnorm: torch.Tensor, eh_proj: Linear, eps: float
) -> torch.Tensor:
    """The MTP block's input at position j: ``eh_proj`` over [enorm(embedding of t_{j+1}) (``e``, normed already),
    hnorm(final norm(h_j))], where h_j is the main model's last hidden state before its final norm."""
    hm = rms_norm(rms_norm(h, final_norm, eps), hnorm, eps)
    return eh_proj(torch.cat([e, hm], dim=-1))


class Mtp:
    """The first MTP layer over positions 0..T-2 of each prompt (see the module docstring), callable on any
    main-model final hidden states of these prompts. The next tokens' embeddings are taken once here; eh_proj, the
    block and the head are read at each call and dropped after use, or with ``keep`` read once and kept (a second
    call, teacher-forced, then reads nothing again)."""

    def __init__(self, env: Env, tokens: torch.Tensor, lens: list[int], keep: bool = False):
        cfg = env.cfg
        self.env, self.lens, self.keep = env, lens, keep
        self.p = f"model.layers.{cfg.num_hidden_layers}."
        self.rows = torch.cat([torch.arange(T - 1) + s for T, s in zip(lens, _starts(lens))]).to(tokens.device)
        name = self.p + "embed_tokens.weight"
        embed = Embedding(env, name if env.has(name) else "model.embed_tokens.weight")
        self.e = rms_norm(embed(tokens[self.rows + 1]), env.norm(self.p + "enorm.weight"), cfg.rms_norm_eps)
        del embed
        self.parts: dict[str, object] = {}

    def _part(self, key: str, make: Callable[[], object]) -> Any:
        part = self.parts.get(key) or make()
        if self.keep:
            self.parts[key] = part
        return part

    def __call__(self, h: torch.Tensor) -> list[torch.Tensor]:
        env, cfg, p = self.env, self.env.cfg, self.p
        eps = cfg.rms_norm_eps
        mlens = [T - 1 for T in self.lens]
        with torch.inference_mode():
            x = mtp_input(
                self.e, h[self.rows], env.norm("model.norm.weight"), env.norm(p + "hnorm.weight"),
                self._part("eh_proj", lambda: env.linear(p + "eh_proj.weight")), eps,
            )  # fmt: skip
            positions = torch.cat([torch.arange(T) for T in mlens])
            rope = tuple(t.to(h.device) for t in rope_tables(cfg, positions))
            if x.shape[0]:
                x = self._part("layer", lambda: Layer(env, cfg.num_hidden_layers))(x, mlens, rope)
                head = self._part(
                    "head", lambda: Head(env, p + "shared_head.norm.weight", p + "shared_head.head.weight")
                )
                logits = head(x)
            else:
                logits = torch.zeros((0, cfg.vocab_size))
        return [t.cpu() for t in logits.split(mlens)]


class MtpDraft:
    """The first MTP module, resident, as a drafter: at position j it reads the main model's final hidden state
    h_j and the next token t_{j+1} and predicts t_{j+2} (the same function as ``Mtp``: enorm of the token's
    embedding, hnorm of the final-normed h_j, ``eh_proj``, one decoder block, the shared head). Its block keeps
    its own rows in the decoding cache (layer index ``num_hidden_layers``)."""

    def __init__(self, env: Env, embed: Embedding, final_norm: torch.Tensor):
        cfg = env.cfg
        n = cfg.num_hidden_layers
        p = f"model.layers.{n}."
        self.env, self.final_norm = env, final_norm
        self.embed = Embedding(env, p + "embed_tokens.weight") if env.has(p + "embed_tokens.weight") else embed
        self.enorm, self.hnorm = env.norm(p + "enorm.weight"), env.norm(p + "hnorm.weight")
        self.eh_proj = env.linear(p + "eh_proj.weight")
        self.layer = Layer(env, n)
        self.head = Head(env, p + "shared_head.norm.weight", p + "shared_head.head.weight")

    def _input(self, h: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        eps = self.env.cfg.rms_norm_eps
        e = rms_norm(self.embed(next_tokens), self.enorm, eps)
        return mtp_input(e, h, self.final_norm, self.hnorm, self.eh_proj, eps)

    def prefill(self, h: torch.Tensor, next_tokens: torch.Tensor, lens: list[int], cache: KVCache) -> torch.Tensor:
        """Every position of each prompt (h [sum of lengths, H] from ``Model.prefill``, the token after each
        position), cache rows written from position 0 into slots 0, 1, ...; float32 logits of each prompt's last
        position [n, vocab]: the draft of the token after the one just chosen."""
        env = self.env
        positions = torch.cat([torch.arange(T) for T in lens]).to(env.device)
        with torch.inference_mode():
            x = self.layer(self._input(h, next_tokens), lens, (cache.cos[positions], cache.sin[positions]),
                           (cache, list(range(len(lens)))))  # fmt: skip
            last = torch.tensor([sl.stop - 1 for sl in _slices(lens)], device=env.device)
            return self.head(x[last])

    def decode(
        self,
        h: torch.Tensor,
        next_tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        static: bool = False,
    ) -> torch.Tensor:
        """One row per (h_j, t_{j+1}) at position j of slot ``slots`` (attending to positions ``< kv_len``);
        float32 logits [rows, vocab]. ``static``: fixed shapes, no host sync (a CUDA graph; ``kv_len`` the cache
        length)."""
        mask = torch.arange(kv_len, device=positions.device)[None, :] > positions[:, None]
        rope = (cache.cos[positions], cache.sin[positions])
        step = Step(cache, positions, slots, rope, mask, kv_len, static, False)
        with torch.inference_mode(), self.env.decoding():
            return self.head(self.layer.decode(self._input(h, next_tokens), step))


def _slices(lens: list[int]) -> list[slice]:
    """Each prompt's rows in the concatenated batch."""
    return [slice(s, s + T) for s, T in zip(_starts(lens), lens)]


def _starts(lens: list[int]) -> list[int]:
    out, s = [], 0
    for T in lens:
        out.append(s)
        s += T
    return out


__all__ = [
    "KVCache",
    "LayerFn",
    "ModelOutput",
    "Teacher",
    "apply_rope",
    "load_model",
    "rms_norm",
    "rope_tables",
    "run_model",
]
