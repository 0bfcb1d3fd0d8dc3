"""The upstream demo's ``ModelArgs`` (its ``--config`` JSON) for a geometry: what ``shard`` writes beside the rank
files so that the demo's ``generate.py`` runs on them as they are, and what ``verify`` checks such a file against."""

from __future__ import annotations

from .config import ModelConfig


def demo_model_args(cfg: ModelConfig) -> dict:
    """The upstream demo's ``ModelArgs`` for ``cfg`` (its ``config.json``), so ``generate.py`` runs on DST as is.

    ``mscale`` is the HF ``mscale_all_dim`` (the demo uses it for the softmax correction, as HF does with
    ``mscale_all_dim``); ``max_seq_len`` is the demo's default 16384 capped by the model's context, since the
    demo sizes its KV cache by it and applies YaRN only when it exceeds ``original_seq_len``.
    """
    rs = cfg.rope_scaling
    args: dict = {
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "inter_dim": cfg.intermediate_size,
        "moe_inter_dim": cfg.moe_intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_dense_layers": cfg.first_k_dense_replace,
        "n_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.num_experts_per_tok,
        "n_expert_groups": cfg.n_group,
        "n_limited_groups": cfg.topk_group,
        "route_scale": cfg.routed_scaling_factor,
        "score_func": cfg.scoring_func,
        "q_lora_rank": cfg.q_lora_rank or 0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
    }
    if cfg.is_fp8:
        args["dtype"] = "fp8"
        if cfg.quant.scale_fmt:
            args["scale_fmt"] = cfg.quant.scale_fmt
    args["max_seq_len"] = min(cfg.max_position_embeddings, 4 * 4096)
    args["original_seq_len"] = rs.original_max_position_embeddings if rs else cfg.max_position_embeddings
    args["rope_theta"] = cfg.rope_theta
    args["rope_factor"] = rs.factor if rs else 1.0
    args["beta_fast"] = _int_if_whole(rs.beta_fast if rs else 32.0)
    args["beta_slow"] = _int_if_whole(rs.beta_slow if rs else 1.0)
    args["mscale"] = rs.mscale_all_dim if rs else 1.0
    return args


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
