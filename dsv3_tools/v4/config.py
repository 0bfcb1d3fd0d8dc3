"""V4Config: one frozen description of a DeepSeek-V4 geometry, read from a HF ``config.json`` (``deepseek_v4``).

A class of its own rather than more fields on ``ModelConfig``: V4 has none of V3's MLA keys (``kv_lora_rank``,
``qk_nope_head_dim``, ``v_head_dim``), no dense layers (``first_k_dense_replace``, ``intermediate_size``) and keys V3
never had (``o_groups``, ``compress_ratios``, ``num_hash_layers``, ``hc_*``). Folding both into one class would make
half the fields optional and V3's derived values (``qk_head_dim``, ``softmax_scale``, ``is_moe_layer``) silently wrong
on V4 for every V3 code path that reads them; a separate type makes a stage that does not know V4 fail loudly.
Facts and sources: docs/format-v4.md section 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import LayerRanges, QuantConfig, RopeScaling, parse_config_file
from ..errors import ConfigError

MODEL_TYPE = "deepseek_v4"
EXPERT_DTYPES = ("fp4", "fp8")

# Keys of the real configs that change neither the tensor set nor anything a stage does.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "attention_bias",
        "attention_dropout",
        "hidden_act",
        "initializer_range",
        "num_key_value_heads",
        "transformers_version",
        "use_cache",
        "dtype",
        "_name_or_path",
    }
)
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "qk_rope_head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "compress_ratios",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "hc_mult",
)


@dataclass(frozen=True)
class V4Config(LayerRanges):
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # query/key/value width per head (one shared K=V head); RoPE on its last qk_rope_head_dim dims
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int  # the grouped low-rank output projection: wo_a per group, then wo_b
    o_lora_rank: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    compress_ratios: tuple[int, ...]  # per layer, MTP layers after the main ones: 0 sliding window only, 4 with indexer
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int  # hyper-connection streams
    n_shared_experts: int = 1
    num_hash_layers: int = 0  # the first layers route by token id (``ffn.gate.tid2eid``) instead of a biased gate
    num_nextn_predict_layers: int = 0
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    compress_rope_theta: float = 160000.0
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    swiglu_limit: float = 0.0
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    quant: QuantConfig | None = None  # the FP8 part only: the FP4 experts are not described by quantization_config
    expert_dtype: str | None = None  # "fp4" / "fp8" when the config says (later revisions, -Base); else from tensors
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    family = "DeepSeek-V4"

    @property
    def is_fp8(self) -> bool:
        return self.quant is not None

    @property
    def block_size(self) -> tuple[int, int]:
        return self.quant.block if self.quant else (128, 128)

    def ratio(self, layer: int) -> int:
        """The KV compression ratio of a layer (0: sliding window only; 4: overlapping windows and the indexer)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def with_layers(self, n: int, mtp: int | None = None) -> V4Config:
        """The same geometry at reduced depth: the first ``n`` layers' ratios, then the MTP layers'."""
        L, m = self.num_hidden_layers, self.num_nextn_predict_layers if mtp is None else mtp
        if n > L or m > max(self.num_nextn_predict_layers, len(self.compress_ratios) - L):
            raise ConfigError(f"cannot grow {L} layers + {self.num_nextn_predict_layers} MTP to {n} + {m}")
        ratios = self.compress_ratios[:n] + self.compress_ratios[L:]
        return replace(
            self,
            num_hidden_layers=n,
            num_nextn_predict_layers=m,
            num_hash_layers=min(self.num_hash_layers, n),
            compress_ratios=ratios,
        )

    def with_experts(self, e: int) -> V4Config:
        return replace(self, n_routed_experts=e, num_experts_per_tok=min(self.num_experts_per_tok, e))

    # ------------------------------------------------------------------ I/O
    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` for this geometry: the original's keys in their order, with this geometry's values."""
        out = dict(self.raw)
        for f in fields(self):
            if f.name in ("raw", "rope_scaling", "quant", "expert_dtype", "model_type"):
                continue
            v = getattr(self, f.name)
            if v is None and f.name not in out:
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["model_type"] = self.model_type
        if self.quant is None:
            out.pop("quantization_config", None)
        elif not _same_quant(out.get("quantization_config"), self.quant):
            q = {"activation_scheme": self.quant.activation_scheme, "fmt": self.quant.fmt, "quant_method": "fp8"}
            if self.quant.scale_fmt:
                q["scale_fmt"] = self.quant.scale_fmt
            out["quantization_config"] = q | {"weight_block_size": list(self.quant.block)}
        if self.expert_dtype is None:
            out.pop("expert_dtype", None)
        else:
            out["expert_dtype"] = self.expert_dtype
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> V4Config:
        return _parse(d)

    @classmethod
    def from_file(cls, path: str | Path) -> V4Config:
        return parse_config_file(path, _parse)


def is_v4(cfg: object) -> bool:
    """Whether a config (of any family) is a DeepSeek-V4 one."""
    return isinstance(cfg, V4Config)


# ---------------------------------------------------------------------- parsing
def _int(d: dict, key: str, default: Any = None, *, minimum: int = 0) -> Any:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _num(d: dict, key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _rope(d: dict) -> RopeScaling | None:
    src = d.get("rope_scaling") or d.get("rope_parameters")
    if not src:
        return None
    if not isinstance(src, dict):
        raise ConfigError(f"rope_scaling must be an object, got {src!r}")
    rtype = src.get("rope_type", src.get("type"))
    if rtype in (None, "default"):
        return None
    if rtype != "yarn":
        raise ConfigError(f"unsupported rope type {rtype!r} (DeepSeek-V4 uses 'yarn')")
    known = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow"}
    known |= {"mscale", "mscale_all_dim", "attention_factor", "partial_rotary_factor"}
    unknown = set(src) - known
    if unknown:
        raise ConfigError(f"unknown rope_scaling field(s): {', '.join(sorted(unknown))}")
    return RopeScaling(
        factor=_num(src, "factor", 1.0),
        original_max_position_embeddings=_int(src, "original_max_position_embeddings", 4096, minimum=1),
        beta_fast=_num(src, "beta_fast", 32.0),
        beta_slow=_num(src, "beta_slow", 1.0),
        mscale=_num(src, "mscale", 1.0),
        mscale_all_dim=_num(src, "mscale_all_dim", 0.0),
    )


def _quant(q: Any) -> QuantConfig | None:
    """The FP8 part of the format (docs/format-v4.md 4.2): e4m3 with 128x128 blocks; any other block is refused."""
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config must be an object, got {q!r}")
    unknown = set(q) - {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt"}
    if unknown:
        raise ConfigError(f"unknown quantization_config field(s): {', '.join(sorted(unknown))}")
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"unsupported quantization {q.get('quant_method')!r}/{q.get('fmt')!r} (V4: fp8 e4m3)")
    if q.get("weight_block_size") != [128, 128]:
        raise ConfigError(f"weight_block_size {q.get('weight_block_size')!r}: DeepSeek-V4 uses [128, 128]")
    if q.get("scale_fmt") not in (None, "ue8m0"):
        raise ConfigError(f"unsupported scale_fmt {q.get('scale_fmt')!r} (known: ue8m0)")
    return QuantConfig(
        block=(128, 128), scale_fmt=q.get("scale_fmt"), activation_scheme=q.get("activation_scheme", "dynamic")
    )


def _same_quant(raw: Any, quant: QuantConfig) -> bool:
    try:
        return _quant(raw) == quant
    except ConfigError:
        return False


def _parse(d: dict[str, Any]) -> V4Config:
    if not isinstance(d, dict):
        raise ConfigError("expected a JSON object")
    if d.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"missing field(s): {', '.join(missing)}")
    own = {f.name for f in fields(V4Config)} - {"raw", "rope_scaling", "quant"}
    known = own | _IGNORED_KEYS | {"rope_scaling", "rope_parameters", "quantization_config"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(unknown)}")
    ratios = d["compress_ratios"]
    if not isinstance(ratios, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ratios
    ):
        raise ConfigError(f"compress_ratios must be a list of integers >= 0, got {ratios!r}")
    ints = {k: _int(d, k, minimum=1) for k in _REQUIRED if k != "compress_ratios"}
    expert_dtype = d.get("expert_dtype")
    if expert_dtype not in (None, *EXPERT_DTYPES):
        raise ConfigError(f"expert_dtype must be one of {', '.join(EXPERT_DTYPES)}, got {expert_dtype!r}")
    scoring = d.get("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise ConfigError(f"scoring_func must be sqrtsoftplus, sigmoid or softmax, got {scoring!r}")
    eos = d.get("eos_token_id")
    cfg = V4Config(
        model_type=MODEL_TYPE,
        **ints,
        compress_ratios=tuple(ratios),
        n_shared_experts=_int(d, "n_shared_experts", 1),
        num_hash_layers=_int(d, "num_hash_layers", 0),
        num_nextn_predict_layers=_int(d, "num_nextn_predict_layers", 0),
        hc_sinkhorn_iters=_int(d, "hc_sinkhorn_iters", 20, minimum=1),
        hc_eps=_num(d, "hc_eps", 1e-6),
        sliding_window=_int(d, "sliding_window", 128, minimum=1),
        compress_rope_theta=_num(d, "compress_rope_theta", 160000.0),
        scoring_func=scoring,
        routed_scaling_factor=_num(d, "routed_scaling_factor", 1.0),
        swiglu_limit=_num(d, "swiglu_limit", 0.0),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        topk_method=str(d.get("topk_method", "noaux_tc")),
        rms_norm_eps=_num(d, "rms_norm_eps", 1e-6),
        rope_theta=_num(d, "rope_theta", 10000.0),
        rope_scaling=_rope(d),
        max_position_embeddings=_int(d, "max_position_embeddings", 4096, minimum=1),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        quant=_quant(d.get("quantization_config")),
        expert_dtype=expert_dtype,
        torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        raw=dict(d),
    )
    _check(cfg)
    return cfg


def _check(c: V4Config) -> None:
    L = c.num_hidden_layers
    if len(c.compress_ratios) < L + c.num_nextn_predict_layers:
        raise ConfigError(
            f"compress_ratios has {len(c.compress_ratios)} entries; {L} layers + {c.num_nextn_predict_layers} MTP "
            "need one each"
        )
    if c.n_shared_experts != 1:
        raise ConfigError(f"n_shared_experts {c.n_shared_experts}: the V4 model has exactly one shared expert")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise ConfigError(f"num_experts_per_tok {c.num_experts_per_tok} exceeds n_routed_experts {c.n_routed_experts}")
    if c.num_hash_layers > L:
        raise ConfigError(f"num_hash_layers {c.num_hash_layers} exceeds num_hidden_layers {L}")
    if c.num_attention_heads % c.o_groups:
        raise ConfigError(f"num_attention_heads {c.num_attention_heads} is not divisible by o_groups {c.o_groups}")
    if c.qk_rope_head_dim % 2 or c.qk_rope_head_dim >= c.head_dim:
        raise ConfigError(f"qk_rope_head_dim {c.qk_rope_head_dim} must be even and below head_dim {c.head_dim}")
    if c.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings is true, but DeepSeek-V4 stores a separate head")
