"""The official DeepSeek-V4 demo's ``ModelArgs`` (its ``inference/config.json``) for a geometry and storage format:
what ``shard`` writes beside V4 rank files, and what ``verify`` checks such a file against.

Keys and order are those of the official V4-Flash file (docs/format-v4.md 4.3); for V4-Flash in its released format
the result is that file. Fields the file leaves out take the demo's defaults (model.py:37-80), listed in
``DEFAULTS``; they are written only where this checkpoint needs another value.
"""

from __future__ import annotations

from . import names as V
from .config import V4Config

# The demo's ModelArgs defaults for the fields its released config.json leaves out or this module may omit.
DEFAULTS = {"dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": None, "scale_dtype": "fp8", "n_mtp_layers": 1}


def demo_model_args(cfg: V4Config, fmt: V.Format, *, mtp: bool = True) -> dict:
    """``ModelArgs`` for the official demo to run rank files of ``cfg`` stored in ``fmt`` (``mtp``: with the MTP
    module). FP8 experts: no ``expert_dtype`` (the demo's README: remove ``"expert_dtype": "fp4"``); F32 scales
    (-Base): ``scale_dtype: fp32`` (the demo still creates E8M0 scale parameters, model.py:142: unconfirmed that it
    runs -Base at all)."""
    rs = cfg.rope_scaling
    args: dict = {
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "moe_inter_dim": cfg.moe_intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_hash_layers": cfg.num_hash_layers,
        "n_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.num_experts_per_tok,
        "score_func": cfg.scoring_func,
        "route_scale": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit,
        "q_lora_rank": cfg.q_lora_rank,
        "head_dim": cfg.head_dim,
        "rope_head_dim": cfg.qk_rope_head_dim,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "window_size": cfg.sliding_window,
        "original_seq_len": rs.original_max_position_embeddings if rs else 0,
        "rope_theta": _whole(cfg.rope_theta),
        "rope_factor": _whole(rs.factor if rs else 1.0),
        "beta_fast": _whole(rs.beta_fast if rs else 32.0),
        "beta_slow": _whole(rs.beta_slow if rs else 1.0),
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
    }
    if fmt.dense == "fp8":
        args["dtype"] = "fp8"
        args["scale_fmt"] = cfg.quant.scale_fmt if cfg.quant else None
        if fmt.experts == "fp4":
            args["expert_dtype"] = "fp4"
        if fmt.scale == "F32":
            args["scale_dtype"] = "fp32"
    else:
        args["dtype"] = "bf16"
    args["compress_rope_theta"] = _whole(cfg.compress_rope_theta)
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    args["compress_ratios"] = list(cfg.compress_ratios[: cfg.num_hidden_layers + max(n_mtp, 1)])
    if n_mtp != DEFAULTS["n_mtp_layers"]:
        args["n_mtp_layers"] = n_mtp
    if cfg.hc_eps != 1e-6:
        args["hc_eps"] = cfg.hc_eps
    if cfg.rms_norm_eps != 1e-6:
        args["norm_eps"] = cfg.rms_norm_eps
    return args


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def differences(args: dict, want: dict) -> list[str]:
    """How a ModelArgs JSON differs from ``want`` (each field as the demo reads it, defaults included)."""
    out = []
    for k in dict.fromkeys([*want, *DEFAULTS]):
        have, need = args.get(k, DEFAULTS.get(k)), want.get(k, DEFAULTS.get(k))
        same = have == need or (
            isinstance(have, (int, float)) and isinstance(need, (int, float)) and float(have) == float(need)
        )
        if not same:
            out.append(f"ModelArgs {k}={have!r} but the checkpoint implies {need!r}")
    return out
