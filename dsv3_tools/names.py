"""The name table: HF tensor names <-> the official model-parallel names and split dims, in one place.

Every stage reads this module: rename and split (shard), which tensors are FP8 (cast), the expected tensor
set (reader validation, inspect, verify). A name is parsed once into fields; unknown names fail closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .config import ModelConfig
from .errors import UnknownNameError

EXPERT = "expert"  # split marker for routed experts: whole experts are partitioned across ranks


@dataclass(frozen=True)
class Module:
    """One row of the table: a module's HF path, its internal (model-parallel) path, how it is split, and what the
    expected tensor set needs to expand it: its shape (as dimension names, see ``dims``), when it exists, its dtype."""

    hf: str  # HF path inside a layer ("self_attn.q_b_proj") or the full top-level path ("lm_head")
    mp: str  # internal path ("attn.wq_b")
    split: int | str | None  # 0 / 1: tensor-parallel dim; EXPERT; None: replicated
    quantized: bool  # an FP8 checkpoint stores this weight as F8_E4M3 plus a weight_scale_inv
    scope: str  # "top", "layer" (any layer), "mtp" (MTP layers only)
    shape: tuple[str, ...] = ()  # the weight's shape, as names of ``dims``
    when: str | None = None  # a condition of ``_applies`` (None: always, within its scope)
    dtype: str = "BF16"  # the weight's dtype when not FP8
    alt: tuple[str, ...] = ()  # other dtypes accepted (facts not confirmed for every release); "fp8": F8_E4M3 + scale
    leaves: tuple[tuple[str, str | None, str, tuple[str, ...]], ...] = ()  # extra (leaf, when, dtype, alt)


# The table, in the order a Hugging Face checkpoint stores a model: top rows before the first layer row come first,
# top rows after the last layer row come last; within a layer, rows in this order; routed experts one expert at a
# time (its three rows together).
# fmt: off
TABLE: tuple[Module, ...] = (
    Module("model.embed_tokens",             "embed",                   0,      False, "top",   ("V", "H")),
    # The MTP module's own rows (layers >= num_hidden_layers), before its decoder block. The demo drops the MTP layer.
    Module("embed_tokens",                   "embed",                   0,      False, "mtp",   ("V", "H")),
    Module("enorm",                          "enorm",                   None,   False, "mtp",   ("H",)),
    Module("hnorm",                          "hnorm",                   None,   False, "mtp",   ("H",)),
    # eh_proj's dtype is unconfirmed for some releases (FORMAT.md): BF16, or FP8 with a scale, are both accepted.
    Module("eh_proj",                        "eh_proj",                 None,   False, "mtp",   ("H", "2H"), alt=("fp8",)),
    Module("input_layernorm",                "attn_norm",               None,   False, "layer", ("H",)),
    Module("self_attn.q_a_proj",             "attn.wq_a",               None,   True,  "layer", ("Q", "H"), "q_lora"),
    Module("self_attn.q_a_layernorm",        "attn.q_norm",             None,   False, "layer", ("Q",), "q_lora"),
    Module("self_attn.q_b_proj",             "attn.wq_b",               0,      True,  "layer", ("NQ", "Q"), "q_lora"),
    Module("self_attn.q_proj",               "attn.wq",                 0,      True,  "layer", ("NQ", "H"), "no_q_lora"),
    Module("self_attn.kv_a_proj_with_mqa",   "attn.wkv_a",              None,   True,  "layer", ("KVA", "H")),
    Module("self_attn.kv_a_layernorm",       "attn.kv_norm",            None,   False, "layer", ("KV",)),
    Module("self_attn.kv_b_proj",            "attn.wkv_b",              0,      True,  "layer", ("NKV", "KV")),
    Module("self_attn.o_proj",               "attn.wo",                 1,      True,  "layer", ("H", "NV")),
    Module("self_attn.indexer.wq_b",         "attn.indexer.wq_b",       None,   True,  "layer", ("IQ", "QI"), "indexer"),
    Module("self_attn.indexer.wk",           "attn.indexer.wk",         None,   True,  "layer", ("ID", "H"), "indexer"),
    Module("self_attn.indexer.k_norm",       "attn.indexer.k_norm",     None,   False, "layer", ("ID",), "indexer",
           alt=("F32",), leaves=(("bias", None, "BF16", ("F32",)),)),
    Module("self_attn.indexer.weights_proj", "attn.indexer.weights_proj", None, False, "layer", ("IH", "H"), "indexer"),
    Module("post_attention_layernorm",       "ffn_norm",                None,   False, "layer", ("H",)),
    Module("mlp.gate",                       "ffn.gate",                None,   False, "layer", ("E", "H"), "moe",
           leaves=(("e_score_correction_bias", "router_bias", "F32", ()),)),
    Module("mlp.experts.{}.gate_proj",       "ffn.experts.{}.w1",       EXPERT, True,  "layer", ("MI", "H"), "moe"),
    Module("mlp.experts.{}.up_proj",         "ffn.experts.{}.w3",       EXPERT, True,  "layer", ("MI", "H"), "moe"),
    Module("mlp.experts.{}.down_proj",       "ffn.experts.{}.w2",       EXPERT, True,  "layer", ("H", "MI"), "moe"),
    Module("mlp.shared_experts.gate_proj",   "ffn.shared_experts.w1",   0,      True,  "layer", ("S", "H"), "shared"),
    Module("mlp.shared_experts.up_proj",     "ffn.shared_experts.w3",   0,      True,  "layer", ("S", "H"), "shared"),
    Module("mlp.shared_experts.down_proj",   "ffn.shared_experts.w2",   1,      True,  "layer", ("H", "S"), "shared"),
    Module("mlp.gate_proj",                  "ffn.w1",                  0,      True,  "layer", ("I", "H"), "dense"),
    Module("mlp.up_proj",                    "ffn.w3",                  0,      True,  "layer", ("I", "H"), "dense"),
    Module("mlp.down_proj",                  "ffn.w2",                  1,      True,  "layer", ("H", "I"), "dense"),
    # The MTP module's head, after its decoder block.
    Module("shared_head.norm",               "shared_head.norm",        None,   False, "mtp",   ("H",)),
    Module("shared_head.head",               "shared_head.head",        0,      False, "mtp",   ("V", "H")),
    Module("model.norm",                     "norm",                    None,   False, "top",   ("H",)),
    Module("lm_head",                        "head",                    0,      False, "top",   ("V", "H")),
)
# fmt: on


def dims(cfg: ModelConfig) -> dict[str, int]:
    """The dimension names the table's shapes use, for one geometry."""
    nh = cfg.num_attention_heads
    d = {
        "H": cfg.hidden_size,
        "2H": 2 * cfg.hidden_size,
        "V": cfg.vocab_size,
        "Q": cfg.q_lora_rank or 0,
        "NQ": nh * cfg.qk_head_dim,
        "KV": cfg.kv_lora_rank,
        "KVA": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "NKV": nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
        "NV": nh * cfg.v_head_dim,
        "I": cfg.intermediate_size,
        "MI": cfg.moe_intermediate_size,
        "S": cfg.n_shared_experts * cfg.moe_intermediate_size,
        "E": cfg.n_routed_experts,
    }
    if cfg.has_indexer:
        d |= {
            "IH": cfg.index_n_heads,
            "ID": cfg.index_head_dim,
            "IQ": cfg.index_n_heads * cfg.index_head_dim,
            "QI": cfg.q_lora_rank or cfg.hidden_size,
        }
    return d


def _applies(cfg: ModelConfig, when: str | None, layer: int | None) -> bool:
    """Whether a row (or leaf) guarded by ``when`` exists in ``layer`` of ``cfg``."""
    if when is None:
        return True
    if when == "q_lora":
        return cfg.has_q_lora
    if when == "no_q_lora":
        return not cfg.has_q_lora
    if when == "indexer":
        return cfg.has_indexer
    if when == "moe":
        return layer is not None and cfg.is_moe_layer(layer)
    if when == "dense":
        return layer is not None and not cfg.is_moe_layer(layer)
    if when == "shared":
        return layer is not None and cfg.is_moe_layer(layer) and cfg.n_shared_experts > 0
    if when == "router_bias":
        return cfg.has_router_bias
    raise AssertionError(f"unknown table condition {when!r}")


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


def mp_to_hf(name: str) -> str:
    return parse_mp(name).hf


SCALE_SUFFIX = "_scale_inv"  # HF: `<weight>_scale_inv` holds a weight's block scales (a multiplier, despite the name)


def scale_name(weight: str) -> str:
    """HF name of the scale that belongs to a HF weight name."""
    return weight + SCALE_SUFFIX


def is_scale(name: str) -> bool:
    """Whether a HF tensor name is a block scale (``..._scale_inv``)."""
    return name.endswith(SCALE_SUFFIX)


def weight_of(scale: str) -> str:
    """HF name of the weight a scale belongs to."""
    return scale.removesuffix(SCALE_SUFFIX)


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
    """Every tensor (weights and scales) a HF checkpoint of ``cfg`` holds, in the table's order: the table expanded
    over the layers (and the MTP layers, with ``mtp``) and the routed experts."""
    out: dict[str, TensorSpec] = {}
    fp8 = cfg.is_fp8
    size = dims(cfg)
    # Modules an FP8 checkpoint keeps in BF16 (e.g. `cast bf16-fp8 --ignore`), by HF module path.
    keep = set((cfg.raw.get("quantization_config") or {}).get("modules_to_not_convert") or ())

    def add(n: Name, m: Module) -> None:
        name, shape = n.hf, tuple(size[k] for k in m.shape)
        if m.quantized and fp8 and name.removesuffix(".weight") not in keep:
            sname = scale_name(name)
            out[name] = TensorSpec(name, shape, "F8_E4M3", sname)
            out[sname] = TensorSpec(sname, cfg.scale_grid(shape), "F32")
        else:
            alt = tuple("F8_E4M3" if a == "fp8" else a for a in m.alt if a != "fp8" or fp8)
            out[name] = TensorSpec(name, shape, m.dtype, None, alt)
        for leaf, when, dtype, alt in m.leaves:
            if _applies(cfg, when, n.layer):
                extra = replace(n, leaf=leaf).hf
                out[extra] = TensorSpec(extra, shape[:1], dtype, None, alt)

    first_layer_row = next(i for i, m in enumerate(TABLE) if m.scope != "top")
    layer_rows = [m for m in TABLE if m.scope != "top"]
    for m in TABLE[:first_layer_row]:
        add(Name(m, "weight"), m)
    for L in cfg.all_layers if mtp else cfg.main_layers:
        rows = [m for m in layer_rows if _applies(cfg, m.when, L) and (m.scope == "layer" or cfg.is_mtp_layer(L))]
        i = 0
        while i < len(rows):
            if rows[i].split != EXPERT:
                add(Name(rows[i], "weight", L), rows[i])
                i += 1
                continue
            group = [m for m in rows[i:] if m.split == EXPERT]  # an expert's rows, together, expert by expert
            for e in range(cfg.n_routed_experts):
                for m in group:
                    add(Name(m, "weight", L, e), m)
            i += len(group)
    for m in TABLE[first_layer_row:]:
        if m.scope == "top":
            add(Name(m, "weight"), m)
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
