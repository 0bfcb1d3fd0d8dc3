"""The name table: HF tensor names <-> the official model-parallel names and split dims, in one place.

Every stage reads this module: rename and split (shard), which tensors are FP8 (cast), the expected tensor
set (reader validation, inspect, verify). A name is parsed once into fields; unknown names fail closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig
from .errors import UnknownNameError

EXPERT = "expert"  # split marker for routed experts: whole experts are partitioned across ranks


@dataclass(frozen=True)
class Module:
    """One row of the table: a module's HF path, its internal (model-parallel) path and how it is split."""

    hf: str  # HF path inside a layer ("self_attn.q_b_proj") or the full top-level path ("lm_head")
    mp: str  # internal path ("attn.wq_b")
    split: int | str | None  # 0 / 1: tensor-parallel dim; EXPERT; None: replicated
    quantized: bool  # an FP8 checkpoint stores this weight as F8_E4M3 plus a weight_scale_inv
    scope: str  # "top", "layer" (any layer), "mtp" (MTP layers only)


# fmt: off
TABLE: tuple[Module, ...] = (
    Module("model.embed_tokens",             "embed",                   0,      False, "top"),
    Module("model.norm",                     "norm",                    None,   False, "top"),
    Module("lm_head",                        "head",                    0,      False, "top"),
    Module("input_layernorm",                "attn_norm",               None,   False, "layer"),
    Module("post_attention_layernorm",       "ffn_norm",                None,   False, "layer"),
    Module("self_attn.q_proj",               "attn.wq",                 0,      True,  "layer"),
    Module("self_attn.q_a_proj",             "attn.wq_a",               None,   True,  "layer"),
    Module("self_attn.q_a_layernorm",        "attn.q_norm",             None,   False, "layer"),
    Module("self_attn.q_b_proj",             "attn.wq_b",               0,      True,  "layer"),
    Module("self_attn.kv_a_proj_with_mqa",   "attn.wkv_a",              None,   True,  "layer"),
    Module("self_attn.kv_a_layernorm",       "attn.kv_norm",            None,   False, "layer"),
    Module("self_attn.kv_b_proj",            "attn.wkv_b",              0,      True,  "layer"),
    Module("self_attn.o_proj",               "attn.wo",                 1,      True,  "layer"),
    Module("self_attn.indexer.wq_b",         "attn.indexer.wq_b",       None,   True,  "layer"),
    Module("self_attn.indexer.wk",           "attn.indexer.wk",         None,   True,  "layer"),
    Module("self_attn.indexer.k_norm",       "attn.indexer.k_norm",     None,   False, "layer"),
    Module("self_attn.indexer.weights_proj", "attn.indexer.weights_proj", None, False, "layer"),
    Module("mlp.gate_proj",                  "ffn.w1",                  0,      True,  "layer"),
    Module("mlp.up_proj",                    "ffn.w3",                  0,      True,  "layer"),
    Module("mlp.down_proj",                  "ffn.w2",                  1,      True,  "layer"),
    Module("mlp.gate",                       "ffn.gate",                None,   False, "layer"),
    Module("mlp.shared_experts.gate_proj",   "ffn.shared_experts.w1",   0,      True,  "layer"),
    Module("mlp.shared_experts.up_proj",     "ffn.shared_experts.w3",   0,      True,  "layer"),
    Module("mlp.shared_experts.down_proj",   "ffn.shared_experts.w2",   1,      True,  "layer"),
    Module("mlp.experts.{}.gate_proj",       "ffn.experts.{}.w1",       EXPERT, True,  "layer"),
    Module("mlp.experts.{}.up_proj",         "ffn.experts.{}.w3",       EXPERT, True,  "layer"),
    Module("mlp.experts.{}.down_proj",       "ffn.experts.{}.w2",       EXPERT, True,  "layer"),
    # The MTP module (layers >= num_hidden_layers). The demo drops it; `shard --mtp keep` writes these names.
    Module("embed_tokens",                   "embed",                   0,      False, "mtp"),
    Module("enorm",                          "enorm",                   None,   False, "mtp"),
    Module("hnorm",                          "hnorm",                   None,   False, "mtp"),
    Module("eh_proj",                        "eh_proj",                 None,   False, "mtp"),
    Module("shared_head.norm",               "shared_head.norm",        None,   False, "mtp"),
    Module("shared_head.head",               "shared_head.head",        0,      False, "mtp"),
)
# fmt: on

# Leaf renames: HF leaf -> internal leaf.
LEAVES = {"weight": "weight", "weight_scale_inv": "scale", "e_score_correction_bias": "bias", "bias": "bias"}

_BY_HF = {m.hf: m for m in TABLE if m.scope != "top" and "{}" not in m.hf}
_BY_HF_TOP = {m.hf: m for m in TABLE if m.scope == "top"}
_BY_MP_LAYER = {m.mp: m for m in TABLE if m.scope != "top" and "{}" not in m.mp}
_BY_MP_TOP = {m.mp: m for m in TABLE if m.scope == "top"}
_EXPERT_HF = {m.hf.split(".")[-1]: m for m in TABLE if m.split == EXPERT}
_EXPERT_MP = {m.mp.split(".")[-1]: m for m in TABLE if m.split == EXPERT}

_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|weight_scale_inv|e_score_correction_bias|bias)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_MP_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|scale|bias)$")
_MP_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)$")


@dataclass(frozen=True)
class Name:
    """A tensor name parsed into fields."""

    module: Module
    leaf: str  # HF leaf: weight / weight_scale_inv / e_score_correction_bias / bias
    layer: int | None = None
    expert: int | None = None

    @property
    def is_scale(self) -> bool:
        return self.leaf == "weight_scale_inv"

    @property
    def split(self) -> int | str | None:
        return self.module.split

    @property
    def hf(self) -> str:
        path = self.module.hf.replace("{}", str(self.expert)) if self.expert is not None else self.module.hf
        if self.layer is None:
            return f"{path}.{self.leaf}"
        return f"model.layers.{self.layer}.{path}.{self.leaf}"

    @property
    def mp(self) -> str:
        path = self.module.mp.replace("{}", str(self.expert)) if self.expert is not None else self.module.mp
        leaf = LEAVES[self.leaf]
        if self.layer is None:
            return f"{path}.{leaf}"
        return f"layers.{self.layer}.{path}.{leaf}"

    @property
    def weight_name(self) -> str:
        """The HF name of the weight this scale belongs to (or of itself)."""
        return self.hf.removesuffix("_scale_inv") if self.is_scale else self.hf


def parse_hf(name: str) -> Name:
    """Parse a HF tensor name; raise ``UnknownNameError`` for anything outside the table."""
    m = _HF_LAYER_RE.match(name)
    if m:
        layer, path, leaf = int(m.group(1)), m.group(2), m.group(3)
        em = _HF_EXPERT_RE.match(path)
        if em:
            return _checked_leaf(Name(_EXPERT_HF[em.group(2)], leaf, layer, int(em.group(1))), name)
        mod = _BY_HF.get(path)
        if mod is not None:
            return _checked_leaf(Name(mod, leaf, layer), name)
    else:
        base, _, leaf = name.rpartition(".")
        if base in _BY_HF_TOP and leaf in LEAVES:
            return _checked_leaf(Name(_BY_HF_TOP[base], leaf), name)
    raise UnknownNameError("not a DeepSeek-V3-family tensor name (not in the name table)", tensor=name)


def _checked_leaf(n: Name, name: str) -> Name:
    if n.leaf == "e_score_correction_bias" and n.module.hf != "mlp.gate":
        raise UnknownNameError("e_score_correction_bias only exists on mlp.gate", tensor=name)
    if n.leaf == "bias" and n.module.hf != "self_attn.indexer.k_norm":
        raise UnknownNameError("unexpected bias leaf", tensor=name)
    # eh_proj's dtype is unconfirmed for some releases (FORMAT.md): accept an FP8 eh_proj with its scale.
    if n.leaf == "weight_scale_inv" and not n.module.quantized and n.module.hf != "eh_proj":
        raise UnknownNameError("a weight_scale_inv on a module that is never quantized", tensor=name)
    return n


def parse_mp(name: str) -> Name:
    """Parse a model-parallel (demo) name back into fields."""
    m = _MP_LAYER_RE.match(name)
    if m:
        layer, path, leaf = int(m.group(1)), m.group(2), m.group(3)
        em = _MP_EXPERT_RE.match(path)
        mod = _EXPERT_MP[em.group(2)] if em else _BY_MP_LAYER.get(path)
        expert = int(em.group(1)) if em else None
        if mod is not None:
            hf_leaf = _mp_leaf_to_hf(mod, leaf)
            return _checked_leaf(Name(mod, hf_leaf, layer, expert), name)
    else:
        base, _, leaf = name.rpartition(".")
        if base in _BY_MP_TOP and leaf in ("weight", "scale"):
            mod = _BY_MP_TOP[base]
            return _checked_leaf(Name(mod, _mp_leaf_to_hf(mod, leaf)), name)
    raise UnknownNameError("not a model-parallel tensor name of this family", tensor=name)


def _mp_leaf_to_hf(mod: Module, leaf: str) -> str:
    if leaf == "bias":
        return "e_score_correction_bias" if mod.hf == "mlp.gate" else "bias"
    return "weight_scale_inv" if leaf == "scale" else "weight"


def hf_to_mp(name: str) -> str:
    return parse_hf(name).mp


def mp_to_hf(name: str) -> str:
    return parse_mp(name).hf


def scale_name(weight: str) -> str:
    """HF name of the scale that belongs to a HF weight name."""
    return weight + "_scale_inv"


# ---------------------------------------------------------------------- expected tensor set
@dataclass(frozen=True)
class TensorSpec:
    name: str  # HF name
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    scale: str | None = None  # HF name of this weight's scale, when it has one
    alt_dtypes: tuple[str, ...] = ()  # other dtypes accepted (facts not confirmed for every release)

    @property
    def parsed(self) -> Name:
        return parse_hf(self.name)


def expected_tensors(cfg: ModelConfig, *, mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor (weights and scales) a HF checkpoint of ``cfg`` holds, in a stable order."""
    out: dict[str, TensorSpec] = {}
    fp8 = cfg.is_fp8
    H, V = cfg.hidden_size, cfg.vocab_size
    # Modules an FP8 checkpoint keeps in BF16 (e.g. `cast bf16-fp8 --ignore`), by HF module path.
    keep = set((cfg.raw.get("quantization_config") or {}).get("modules_to_not_convert") or ())

    def add(name: str, shape: tuple[int, ...], quantized: bool = False, dtype: str = "BF16", alt: tuple = ()) -> None:
        if quantized and fp8 and name.removesuffix(".weight") not in keep:
            sname = scale_name(name)
            out[name] = TensorSpec(name, shape, "F8_E4M3", sname)
            out[sname] = TensorSpec(sname, cfg.scale_grid(shape), "F32")
        else:
            out[name] = TensorSpec(name, shape, dtype, None, alt)

    add("model.embed_tokens.weight", (V, H))
    layers = cfg.all_layers if mtp else cfg.main_layers
    for L in layers:
        p = f"model.layers.{L}."
        if cfg.is_mtp_layer(L):
            add(p + "embed_tokens.weight", (V, H))
            add(p + "enorm.weight", (H,))
            add(p + "hnorm.weight", (H,))
            # The eh_proj dtype is not confirmed for every release: BF16, or FP8 with a scale, are both accepted.
            add(p + "eh_proj.weight", (H, 2 * H), alt=("F8_E4M3",) if fp8 else ())
        add(p + "input_layernorm.weight", (H,))
        nh = cfg.num_attention_heads
        if cfg.has_q_lora:
            add(p + "self_attn.q_a_proj.weight", (cfg.q_lora_rank, H), True)
            add(p + "self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,))
            add(p + "self_attn.q_b_proj.weight", (nh * cfg.qk_head_dim, cfg.q_lora_rank), True)
        else:
            add(p + "self_attn.q_proj.weight", (nh * cfg.qk_head_dim, H), True)
        add(p + "self_attn.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), True)
        add(p + "self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,))
        add(p + "self_attn.kv_b_proj.weight", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), True)
        add(p + "self_attn.o_proj.weight", (H, nh * cfg.v_head_dim), True)
        if cfg.has_indexer:
            ih, idim = cfg.index_n_heads, cfg.index_head_dim
            add(p + "self_attn.indexer.wq_b.weight", (ih * idim, cfg.q_lora_rank or H), True)
            add(p + "self_attn.indexer.wk.weight", (idim, H), True)
            add(p + "self_attn.indexer.k_norm.weight", (idim,), alt=("F32",))
            add(p + "self_attn.indexer.k_norm.bias", (idim,), alt=("F32",))
            add(p + "self_attn.indexer.weights_proj.weight", (ih, H))
        add(p + "post_attention_layernorm.weight", (H,))
        if cfg.is_moe_layer(L):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            add(p + "mlp.gate.weight", (E, H))
            if cfg.has_router_bias:
                add(p + "mlp.gate.e_score_correction_bias", (E,), dtype="F32")
            for e in range(E):
                add(p + f"mlp.experts.{e}.gate_proj.weight", (I, H), True)
                add(p + f"mlp.experts.{e}.up_proj.weight", (I, H), True)
                add(p + f"mlp.experts.{e}.down_proj.weight", (H, I), True)
            if cfg.n_shared_experts:
                S = cfg.n_shared_experts * I
                add(p + "mlp.shared_experts.gate_proj.weight", (S, H), True)
                add(p + "mlp.shared_experts.up_proj.weight", (S, H), True)
                add(p + "mlp.shared_experts.down_proj.weight", (H, S), True)
        else:
            I = cfg.intermediate_size
            add(p + "mlp.gate_proj.weight", (I, H), True)
            add(p + "mlp.up_proj.weight", (I, H), True)
            add(p + "mlp.down_proj.weight", (H, I), True)
        if cfg.is_mtp_layer(L):
            add(p + "shared_head.norm.weight", (H,))
            add(p + "shared_head.head.weight", (V, H))
    add("model.norm.weight", (H,))
    add("lm_head.weight", (V, H))
    return out


def quantizable_weights(cfg: ModelConfig, *, mtp: bool = True) -> list[str]:
    """HF names of the weights an FP8 checkpoint of this geometry stores as FP8 (the name table's default)."""
    names = []
    for spec in expected_tensors(cfg, mtp=mtp).values():
        n = parse_hf(spec.name)
        if n.leaf == "weight" and n.module.quantized:
            names.append(spec.name)
    return names


def is_mtp_name(cfg: ModelConfig, name: str) -> bool:
    """Whether a HF tensor name belongs to an MTP layer of ``cfg`` (False for names outside the table)."""
    try:
        layer = parse_hf(name).layer
    except UnknownNameError:
        return False
    return layer is not None and cfg.is_mtp_layer(layer)


def layer_of(name: str) -> int | None:
    """The layer number of a HF tensor name (None for top-level tensors)."""
    return parse_hf(name).layer


def local_experts(cfg: ModelConfig, rank: int, world: int) -> range:
    """Routed experts owned by ``rank`` of ``world``: a contiguous block."""
    per = cfg.n_routed_experts // world
    return range(rank * per, (rank + 1) * per)


def expected_mp_tensors(cfg: ModelConfig, rank: int, world: int, *, mtp: bool = False) -> dict[str, TensorSpec]:
    """The tensors of ``model{rank}-mp{world}.safetensors``, keyed by model-parallel name (shapes per rank).

    Assumes ``world`` is a valid degree for ``cfg`` (the shard planner checks that first).
    """
    out: dict[str, TensorSpec] = {}
    experts = local_experts(cfg, rank, world)
    hf = expected_tensors(cfg, mtp=mtp)
    for spec in hf.values():
        n = parse_hf(spec.name)
        if n.split == EXPERT:
            if n.expert not in experts:
                continue
            shape = spec.shape
        elif isinstance(n.split, int):
            shape = list(spec.shape)
            shape[n.split] //= world
            shape = tuple(shape)
        else:
            shape = spec.shape
        scale = parse_hf(spec.scale).mp if spec.scale else None
        out[n.mp] = TensorSpec(n.mp, shape, spec.dtype, scale, spec.alt_dtypes)
    return out
