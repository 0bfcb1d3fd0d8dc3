"""ModelConfig: one frozen description of a DeepSeek-V3-family geometry, read from a HF ``config.json``.

Accepts the transformers 4 (``rope_scaling``) and 5 (``rope_parameters``) schemas and the block-FP8
``quantization_config``. Derived values are properties; they are never re-entered as flags.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def parse_config_file(path: str | Path, parse: Callable[[dict[str, Any]], T]) -> T:
    """``parse`` applied to a ``config.json`` file's object; every failure a ``ConfigError`` naming the file."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    try:
        return parse(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


class LayerRanges:
    """Layer ids of a config with ``num_hidden_layers`` main layers followed by ``num_nextn_predict_layers`` MTP
    layers (both families)."""

    num_hidden_layers: int
    num_nextn_predict_layers: int

    @property
    def main_layers(self) -> range:
        return range(self.num_hidden_layers)

    @property
    def mtp_layers(self) -> range:
        """The MTP layers' ids (MTP module m is layer ``num_hidden_layers + m``)."""
        return range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)

    @property
    def all_layers(self) -> range:
        return range(self.num_hidden_layers + self.num_nextn_predict_layers)

    def is_mtp_layer(self, layer: int) -> bool:
        return layer >= self.num_hidden_layers


# Keys found in real configs of the family that do not change the tensor set or the forward pass.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "attention_bias",
        "attention_dropout",
        "auto_map",
        "aux_loss_alpha",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "ep_size",
        "hidden_act",
        "initializer_range",
        "pretraining_tp",
        "seq_aux",
        "transformers_version",
        "use_cache",
        "torch_dtype",
        "dtype",
        "num_key_value_heads",
        "moe_layer_freq",
        "rope_interleave",
        "head_dim",
        "model_name",
        "_name_or_path",
        "output_router_logits",
        "router_aux_loss_coef",
        "max_window_layers",
        "use_sliding_window",
        "sliding_window",
        "mlp_layer_types",
    }
)

FAMILY_TYPES = {"deepseek_v3", "deepseek_v2", "deepseek_v32", "kimi_k2"}


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` in transformers 4, ``rope_parameters`` in 5)."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Block-FP8 weight format (``quantization_config``)."""

    fmt: str = "e4m3"
    block: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # None (plain f32 amax/448) or "ue8m0" (power-of-two, rounded up)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig(LayerRanges):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_nextn_predict_layers: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    quant: QuantConfig | None = None
    torch_dtype: str = "bfloat16"
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def has_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        return self.quant is not None

    @property
    def block_size(self) -> tuple[int, int]:
        return self.quant.block if self.quant else (128, 128)

    @property
    def has_router_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def has_indexer(self) -> bool:
        return self.index_n_heads is not None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in self.main_layers if not self.is_moe_layer(i)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in self.main_layers if self.is_moe_layer(i)]

    def scale_grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Shape of the ``weight_scale_inv`` of a 2-D weight: the ceil grid of its blocks."""
        b0, b1 = self.block_size
        return (math.ceil(shape[0] / b0), math.ceil(shape[1] / b1))

    @property
    def softmax_scale(self) -> float:
        """Attention softmax scale, with YaRN's mscale correction applied."""
        s = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.type == "yarn" and rs.mscale_all_dim and rs.factor > 1:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            s = s * m * m
        return s

    def with_layers(self, n: int, mtp: int | None = None) -> ModelConfig:
        """The same geometry at reduced depth (for benchmarks and tests)."""
        first_dense = min(self.first_k_dense_replace, n)
        return replace(
            self,
            num_hidden_layers=n,
            first_k_dense_replace=first_dense,
            num_nextn_predict_layers=self.num_nextn_predict_layers if mtp is None else mtp,
        )

    # ------------------------------------------------------------------ I/O
    def to_hf_dict(self) -> dict[str, Any]:
        """A HF ``config.json`` dict (transformers 4 schema) for this geometry, keeping unknown-but-ignored keys."""
        out: dict[str, Any] = {k: v for k, v in self.raw.items() if k in _IGNORED_KEYS}
        for f in fields(self):
            if f.name in ("raw", "rope_scaling", "quant"):
                continue
            v = getattr(self, f.name)
            if v is None and f.name in (
                "index_n_heads",
                "index_head_dim",
                "index_topk",
                "bos_token_id",
                "eos_token_id",
            ):
                continue
            out[f.name] = v
        out.setdefault(
            "architectures", ["DeepseekV3ForCausalLM" if self.model_type != "deepseek_v2" else "DeepseekV2ForCausalLM"]
        )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = {
                "type": rs.type,
                "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast,
                "beta_slow": rs.beta_slow,
                "mscale": rs.mscale,
                "mscale_all_dim": rs.mscale_all_dim,
            }
        else:
            out["rope_scaling"] = None
        if self.quant is not None:
            q = {
                "quant_method": "fp8",
                "fmt": self.quant.fmt,
                "activation_scheme": self.quant.activation_scheme,
                "weight_block_size": list(self.quant.block),
            }
            if self.quant.scale_fmt:
                q["scale_fmt"] = self.quant.scale_fmt
            out["quantization_config"] = q
        out.pop("dtype", None)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _parse(d)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return parse_config_file(path, _parse)

    @classmethod
    def builtin(cls, name: str) -> ModelConfig:
        """A geometry shipped in ``configs/`` (``tiny``, ``deepseek-v3``, ...)."""
        path = builtin_config_path(name)
        return cls.from_file(path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> ModelConfig:
        """A built-in name, a config.json path, or a checkpoint folder holding one."""
        p = Path(name_or_path)
        if p.is_dir():
            for cand in ("config.json",):
                if (p / cand).is_file():
                    return cls.from_file(p / cand)
            raise ConfigError(f"{p}: folder has no config.json")
        if p.is_file():
            return cls.from_file(p)
        return cls.builtin(str(name_or_path))


def builtin_names() -> list[str]:
    root = resources.files("dsv3_tools.configs")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def builtin_config_path(name: str) -> Path:
    root = resources.files("dsv3_tools.configs")
    cand = root / f"{name}.json"
    if not cand.is_file():
        raise ConfigError(f"unknown built-in config {name!r}; choose one of: {', '.join(builtin_names())}")
    return Path(str(cand))


# ---------------------------------------------------------------------- parsing
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def _int(d: dict, key: str, default: Any = None, *, minimum: int = 0) -> Any:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _num(d: dict, key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _parse_rope(d: dict) -> tuple[RopeScaling | None, float]:
    theta = d.get("rope_theta")
    rs_old = d.get("rope_scaling")
    rs_new = d.get("rope_parameters")
    for key, v in (("rope_scaling", rs_old), ("rope_parameters", rs_new)):
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{key} must be an object, got {v!r}")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))):
        raise ConfigError(f"rope_theta must be a number, got {theta!r}")
    src = None
    if rs_old and rs_new:
        # transformers 5 keeps both; they must agree.
        a = {k: v for k, v in rs_old.items() if k not in ("type", "rope_type")}
        b = {k: v for k, v in rs_new.items() if k not in ("type", "rope_type", "rope_theta")}
        if any(k in b and b[k] != v for k, v in a.items()):
            raise ConfigError("rope_scaling and rope_parameters disagree")
        src = rs_new
    else:
        src = rs_new or rs_old
    if rs_new and "rope_theta" in rs_new:
        if theta is not None and float(theta) != float(rs_new["rope_theta"]):
            raise ConfigError(f"rope_theta {theta} contradicts rope_parameters.rope_theta {rs_new['rope_theta']}")
        theta = rs_new["rope_theta"]
    theta = 10000.0 if theta is None else float(theta)
    if not src:
        return None, theta
    if not isinstance(src, dict):
        raise ConfigError(f"rope_scaling must be an object, got {src!r}")
    rtype = src.get("rope_type", src.get("type"))
    if rtype in (None, "default"):
        return None, theta
    if rtype != "yarn":
        raise ConfigError(f"unsupported rope type {rtype!r} (this family uses 'yarn')")
    known = {
        "type",
        "rope_type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "partial_rotary_factor",
        "truncate",
        "attention_factor",
    }
    unknown = set(src) - known
    if unknown:
        raise ConfigError(f"unknown rope_scaling field(s): {', '.join(sorted(unknown))}")
    rs = RopeScaling(
        type="yarn",
        factor=_num(src, "factor", 1.0),
        original_max_position_embeddings=_int(src, "original_max_position_embeddings", 4096, minimum=1),
        beta_fast=_num(src, "beta_fast", 32.0),
        beta_slow=_num(src, "beta_slow", 1.0),
        mscale=_num(src, "mscale", 1.0),
        mscale_all_dim=_num(src, "mscale_all_dim", 0.0),
    )
    if rs.factor < 1:
        raise ConfigError(f"rope_scaling.factor must be >= 1, got {rs.factor}")
    return rs, theta


def _parse_quant(q: Any) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"unsupported quant_method {method!r} (only block 'fp8' is known)")
    known = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "modules_to_not_convert"}
    unknown = set(q) - known
    if unknown:
        raise ConfigError(f"unknown quantization_config field(s): {', '.join(sorted(unknown))}")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"unsupported fp8 fmt {fmt!r} (only e4m3)")
    block = q.get("weight_block_size")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"unsupported scale_fmt {scale_fmt!r} (known: ue8m0)")
    return QuantConfig(
        fmt=fmt,
        block=(block[0], block[1]),
        scale_fmt=scale_fmt,
        activation_scheme=q.get("activation_scheme", "dynamic"),
    )


def _parse(d: dict[str, Any]) -> ModelConfig:
    try:
        return _parse_fields(d)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a field of the wrong JSON type
        raise ConfigError(f"a field has the wrong type or value ({type(e).__name__}: {e})") from None


def _parse_fields(d: dict[str, Any]) -> ModelConfig:
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in FAMILY_TYPES:
        raise ConfigError(f"model_type {mt!r} is not a DeepSeek-V3-family type ({', '.join(sorted(FAMILY_TYPES))})")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"missing field(s): {', '.join(missing)}")
    own = {f.name for f in fields(ModelConfig)} - {"raw", "rope_scaling", "quant"}
    known = own | _IGNORED_KEYS | {"rope_scaling", "rope_parameters", "quantization_config", "model_type"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(unknown)}")

    rope, theta = _parse_rope(d)
    quant = _parse_quant(d.get("quantization_config"))
    q_lora = d.get("q_lora_rank")
    if q_lora is not None:
        q_lora = _int(d, "q_lora_rank")
    scoring = d.get("scoring_func", "softmax")
    if scoring not in ("sigmoid", "softmax"):
        raise ConfigError(f"scoring_func must be 'sigmoid' or 'softmax', got {scoring!r}")
    topk_method = d.get("topk_method", "noaux_tc" if scoring == "sigmoid" else "greedy")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(f"unknown topk_method {topk_method!r}")
    dtype = d.get("torch_dtype", d.get("dtype", "bfloat16"))
    cfg = ModelConfig(
        model_type=mt,
        vocab_size=_int(d, "vocab_size", minimum=1),
        hidden_size=_int(d, "hidden_size", minimum=1),
        intermediate_size=_int(d, "intermediate_size", minimum=1),
        moe_intermediate_size=_int(d, "moe_intermediate_size", minimum=1),
        num_hidden_layers=_int(d, "num_hidden_layers", minimum=1),
        num_attention_heads=_int(d, "num_attention_heads", minimum=1),
        n_routed_experts=_int(d, "n_routed_experts", minimum=1),
        n_shared_experts=_int(d, "n_shared_experts", 0) or 0,
        num_experts_per_tok=_int(d, "num_experts_per_tok", minimum=1),
        first_k_dense_replace=_int(d, "first_k_dense_replace", 0),
        kv_lora_rank=_int(d, "kv_lora_rank", minimum=1),
        qk_nope_head_dim=_int(d, "qk_nope_head_dim", minimum=1),
        qk_rope_head_dim=_int(d, "qk_rope_head_dim", minimum=2),
        v_head_dim=_int(d, "v_head_dim", minimum=1),
        q_lora_rank=q_lora or None,
        num_nextn_predict_layers=_int(d, "num_nextn_predict_layers", 0),
        n_group=_int(d, "n_group", 1, minimum=1) or 1,
        topk_group=_int(d, "topk_group", 1, minimum=1) or 1,
        routed_scaling_factor=_num(d, "routed_scaling_factor", 1.0),
        scoring_func=scoring,
        topk_method=topk_method,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        rms_norm_eps=_num(d, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=rope,
        max_position_embeddings=_int(d, "max_position_embeddings", 4096, minimum=1),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        quant=quant,
        torch_dtype=str(dtype),
        index_n_heads=_int(d, "index_n_heads"),
        index_head_dim=_int(d, "index_head_dim"),
        index_topk=_int(d, "index_topk"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id") if not isinstance(d.get("eos_token_id"), list) else d["eos_token_id"][0],
        raw=dict(d),
    )
    _check(cfg)
    return cfg


def _check(c: ModelConfig) -> None:
    if c.n_routed_experts % c.n_group:
        raise ConfigError(f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}")
    if c.topk_group > c.n_group:
        raise ConfigError(f"topk_group {c.topk_group} exceeds n_group {c.n_group}")
    if c.num_experts_per_tok > c.n_routed_experts:
        raise ConfigError(f"num_experts_per_tok {c.num_experts_per_tok} exceeds n_routed_experts {c.n_routed_experts}")
    per_group = c.n_routed_experts // c.n_group
    if c.topk_method == "noaux_tc" and c.n_group > 1 and per_group < 2:
        raise ConfigError("noaux_tc group scores need at least 2 experts per group")
    if c.topk_group * per_group < c.num_experts_per_tok:
        raise ConfigError(
            f"topk_group {c.topk_group} groups of {per_group} experts cannot hold num_experts_per_tok {c.num_experts_per_tok}"
        )
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise ConfigError(
            f"first_k_dense_replace {c.first_k_dense_replace} exceeds num_hidden_layers {c.num_hidden_layers}"
        )
    if c.topk_method == "noaux_tc" and c.scoring_func != "sigmoid":
        raise ConfigError("topk_method 'noaux_tc' requires scoring_func 'sigmoid'")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim must be even, got {c.qk_rope_head_dim}")
    if c.has_indexer and (c.index_head_dim is None or c.index_topk is None):
        raise ConfigError("index_n_heads given without index_head_dim/index_topk")
    if c.has_indexer and c.model_type != "deepseek_v32":
        raise ConfigError(f"indexer fields present but model_type is {c.model_type!r}, not 'deepseek_v32'")
    if c.model_type == "deepseek_v32" and not c.has_indexer:
        raise ConfigError("model_type 'deepseek_v32' needs index_n_heads, index_head_dim and index_topk")
    if c.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings is true, but this family stores a separate lm_head")
