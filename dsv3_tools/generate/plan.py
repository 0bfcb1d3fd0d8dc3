"""The memory plan of a generation run, checked before any weight is read.

Per rank: the weights as the model holds them (the compute dtype, or FP8 plus f32 block scales on the FP8 GEMM
path; norms and the router in f32; this rank's slices and experts only), ``kv_b`` dequantized once for the absorbed
attention when the weights stay FP8, the KV cache (``layers x batch x max_len x (kv_lora_rank + rope dims)`` in the
compute dtype; every rank holds all of it, as the latent is not split), the largest prefill's activations
(``batch x max_len`` tokens, one prompt's attention scores in f32), and the largest weight in flight while loading.
It must fit in 90% of the free memory; if not, the one-line error says what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import names as N
from ..config import ModelConfig
from ..disk import human_bytes
from ..errors import Dsv3Error

_F32_MODULES = {
    "input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm",
    "model.norm", "mlp.gate",
}  # fmt: skip
FRACTION = 0.9


class PlanError(Dsv3Error):
    """The run would not fit in memory."""


@dataclass
class GeneratePlan:
    device: str
    world: int
    batch: int
    max_len: int
    dtype: str  # compute dtype ("float32", "bfloat16")
    gemm: str
    weights_bytes: int
    absorbed_bytes: int
    cache_bytes: int
    activation_bytes: int
    transient_bytes: int
    available_bytes: int | None
    cache_per_sequence: int  # bytes of KV cache per sequence slot
    activations_per_sequence: int  # the prefill's part that grows with the batch
    largest_numel: int  # elements of the largest weight
    mtp: bool = False  # the MTP module resident too, with its cache layer (--speculative mtp)

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes + self.absorbed_bytes + self.cache_bytes + self.activation_bytes + self.transient_bytes
        )

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= FRACTION * self.available_bytes


def weights_bytes(
    cfg: ModelConfig, world: int, dtype: torch.dtype, gemm: str, mtp: bool = False
) -> tuple[int, int, int]:
    """This rank's weights as held (with the MTP module when ``mtp``), the absorbed ``kv_b`` copy, and the largest
    tensor's element count."""
    import torch

    esize = torch.empty((), dtype=dtype).element_size()
    fp8_held = gemm == "fp8" and cfg.is_fp8
    total = absorbed = largest = 0
    for name, spec in N.expected_mp_tensors(cfg, 0, world, mtp=mtp and cfg.num_nextn_predict_layers > 0).items():
        n = N.parse_mp(name)
        if "indexer" in n.module.hf:  # V3.2's indexer is not run (attention is dense up to index_topk)
            continue
        numel = math.prod(spec.shape)
        largest = max(largest, numel)
        if n.is_scale:
            total += 4 * numel if fp8_held else 0
        elif spec.dtype == "F8_E4M3":
            total += numel * (1 if fp8_held else esize)
            if fp8_held and n.module.hf == "self_attn.kv_b_proj":
                absorbed += numel * esize
        elif spec.dtype == "F32" or n.module.hf in _F32_MODULES:
            total += 4 * numel
        else:
            total += numel * esize
    return total, absorbed, largest


def make_plan(
    cfg: ModelConfig,
    *,
    world: int,
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    gemm: str,
    device: str,
    available: int | None,
    weights: tuple[int, int, int] | None = None,
    mtp: bool = False,
) -> GeneratePlan:
    """Estimate this rank's peak for ``batch`` sequences of up to ``max_len`` tokens (``weights``: the result of
    ``weights_bytes`` for these settings, when already known)."""
    import torch

    esize = torch.empty((), dtype=dtype).element_size()
    weights, absorbed, largest = weights if weights is not None else weights_bytes(cfg, world, dtype, gemm, mtp)
    layers = cfg.num_hidden_layers + (1 if mtp else 0)
    cache_seq = layers * max_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * esize
    nh = cfg.num_attention_heads // world
    wide = max(cfg.intermediate_size // world, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1), 1)
    per_token = esize * (8 * cfg.hidden_size + nh * (3 * cfg.qk_head_dim + 2 * cfg.v_head_dim) + 3 * wide)
    per_token += 4 * cfg.n_routed_experts  # router scores in f32
    act_seq = max_len * per_token + 4 * cfg.vocab_size  # a prompt's activations, its last logits
    scores = 2 * 4 * nh * max_len * max_len  # one prompt's attention scores and probabilities (f32)
    transient = largest * (4 + esize + 1)  # a weight read, in f32 while dequantized, in the compute dtype
    return GeneratePlan(
        device, world, batch, max_len, str(dtype).removeprefix("torch."), gemm, weights, absorbed, batch * cache_seq,
        batch * act_seq + scores, transient, available, cache_seq, act_seq, largest, mtp,
    )  # fmt: skip


def check_plan(plan: GeneratePlan, cfg: ModelConfig) -> None:
    """Raise ``PlanError`` (one line: the numbers and what to change) when the plan does not fit."""
    import torch

    if plan.fits:
        return
    budget = FRACTION * plan.available_bytes
    fixed = plan.weights_bytes + plan.absorbed_bytes + plan.transient_bytes
    scores = plan.activation_bytes - plan.batch * plan.activations_per_sequence
    fixes = []
    per_seq = plan.cache_per_sequence + plan.activations_per_sequence
    room = budget - fixed - scores
    if room >= per_seq and plan.batch > 1:
        fixes.append(f"--max-batch-size {min(plan.batch - 1, int(room // per_seq))}")
    # The context length that fits this batch (cache, activations and scores all shrink with it).
    w = (plan.weights_bytes, plan.absorbed_bytes, plan.largest_numel)
    lo, hi = 1, plan.max_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = make_plan(cfg, world=plan.world, batch=plan.batch, max_len=mid, dtype=getattr(torch, plan.dtype),
                      gemm=plan.gemm, device=plan.device, available=plan.available_bytes, weights=w,
                      mtp=plan.mtp)  # fmt: skip
        lo, hi = (mid, hi) if p.fits else (lo, mid - 1)
    if lo >= 16 and lo < plan.max_len:
        fixes.append(f"--max-seq-len {lo}")
    if fixed > budget or not fixes:
        fixes.append(f"more ranks (torchrun --nproc-per-node {2 * plan.world}) to split the weights")
    raise PlanError(
        f"memory plan: needs {human_bytes(plan.total_bytes)} per rank on {plan.device} but {human_bytes(plan.available_bytes)} "
        f"is free (weights {human_bytes(plan.weights_bytes + plan.absorbed_bytes)}, KV cache {human_bytes(plan.cache_bytes)} for "
        f"{plan.batch} x {plan.max_len} tokens, activations {human_bytes(plan.activation_bytes)}): use "
        + " or ".join(fixes)
    )
