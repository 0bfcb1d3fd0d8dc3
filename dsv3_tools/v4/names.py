"""The DeepSeek-V4 name table: every tensor of a V4 checkpoint as data, in one place.

V4 checkpoints already use DeepSeek's short names (``embed.weight``, ``layers.N.attn.wq_b.weight``, ``mtp.0.e_proj``)
and the official converter renames nothing (docs/format-v4.md 5.2), so one name serves both the Hugging Face folder
and the model-parallel rank files. A row gives a tensor's name after its block prefix, the dim the official
converter splits it on, how it is quantized, its shape as dimension names, and when it exists. Rows expand into the
expected tensor set of a config and a storage ``Format``; a name outside the table fails closed.

Quantization kinds: ``"fp8"`` dense weights (F8_E4M3 with a ``.scale`` per 128x128 block: F8_E8M0 in the released
Flash/Pro, F32 in -Base per two non-official sources, so the scale dtype is read from the checkpoint); ``"expert"``
routed experts (FP4 e2m1 packed two per byte along the input dim in I8 ``[out, in/2]`` with F8_E8M0 ``.scale``
``[out, in/32]``, or FP8 like the dense weights in -Base); ``None``: stored in ``dtype``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import UnknownNameError
from .config import V4Config

EXPERT = "expert"  # split marker for routed experts: whole experts are partitioned across ranks
SCALE = ".scale"  # a quantized weight ``<prefix>.weight`` has its scales in ``<prefix>.scale``
FP4_GROUP = 32  # FP4 values per E8M0 scale, along the input dim
BLOCK = 128  # the FP8 block (rows and columns)


@dataclass(frozen=True)
class Row:
    """One kind of tensor: its name after the block prefix (``"{}"``: the expert), where it lives, how the official
    model-parallel layout splits it, how it is quantized, its shape (names of ``dims`` or integers), when it exists."""

    name: str
    scope: str  # "top" (no prefix), "block" (every layers.N. and mtp.M.), "mtp" (mtp.M. only)
    split: int | str | None  # 0 / 1: the dim split across ranks; EXPERT; None: replicated
    quant: str | None  # "fp8", "expert" or None (see the module docstring)
    shape: tuple[str | int, ...]
    dtype: str = "BF16"  # when not quantized
    when: str | None = None  # "hash", "bias_gate", "compressor", "indexer" (see ``applies``); None: always


# The table, in the order the released checkpoints store a model (embed first; each layer in its own file; head,
# final norm and hc_head after the last layer; the MTP module last). Split dims: inference/convert.py:72-78 and its
# key rule (111-125), see docs/format-v4.md 5.3; shapes and dtypes: 2.1-2.2 and 3.1.
# fmt: off
TABLE: tuple[Row, ...] = (
    Row("embed.weight",                          "top",   0,      None,     ("V", "H")),
    # the MTP module's own input side (model.py:739-747), before its block
    Row("e_proj.weight",                         "mtp",   None,   "fp8",    ("H", "H")),
    Row("h_proj.weight",                         "mtp",   None,   "fp8",    ("H", "H")),
    Row("enorm.weight",                          "mtp",   None,   None,     ("H",)),
    Row("hnorm.weight",                          "mtp",   None,   None,     ("H",)),
    # a block (model.py:652-672, Attention 446-471, MoE 608-628)
    Row("attn_norm.weight",                      "block", None,   None,     ("H",)),
    Row("ffn_norm.weight",                       "block", None,   None,     ("H",)),
    Row("hc_attn_fn",                            "block", None,   None,     ("MIX", "HCH"), "F32"),
    Row("hc_ffn_fn",                             "block", None,   None,     ("MIX", "HCH"), "F32"),
    Row("hc_attn_base",                          "block", None,   None,     ("MIX",), "F32"),
    Row("hc_ffn_base",                           "block", None,   None,     ("MIX",), "F32"),
    Row("hc_attn_scale",                         "block", None,   None,     (3,), "F32"),
    Row("hc_ffn_scale",                          "block", None,   None,     (3,), "F32"),
    Row("attn.attn_sink",                        "block", 0,      None,     ("NH",), "F32"),
    Row("attn.wq_a.weight",                      "block", None,   "fp8",    ("Q", "H")),
    Row("attn.q_norm.weight",                    "block", None,   None,     ("Q",)),
    Row("attn.wq_b.weight",                      "block", 0,      "fp8",    ("NHD", "Q")),
    Row("attn.wkv.weight",                       "block", None,   "fp8",    ("D", "H")),
    Row("attn.kv_norm.weight",                   "block", None,   None,     ("D",)),
    Row("attn.wo_a.weight",                      "block", 0,      "fp8",    ("GR", "NHDG")),
    Row("attn.wo_b.weight",                      "block", 1,      "fp8",    ("H", "GR")),
    Row("attn.compressor.ape",                   "block", None,   None,     ("R", "CD"), "F32", "compressor"),
    Row("attn.compressor.wkv.weight",            "block", None,   None,     ("CD", "H"), "BF16", "compressor"),
    Row("attn.compressor.wgate.weight",          "block", None,   None,     ("CD", "H"), "BF16", "compressor"),
    Row("attn.compressor.norm.weight",           "block", None,   None,     ("D",), "BF16", "compressor"),
    Row("attn.indexer.wq_b.weight",              "block", 0,      "fp8",    ("IHD", "Q"), "BF16", "indexer"),
    Row("attn.indexer.weights_proj.weight",      "block", 0,      None,     ("IH", "H"), "BF16", "indexer"),
    Row("attn.indexer.compressor.ape",           "block", None,   None,     (4, "2ID"), "F32", "indexer"),
    Row("attn.indexer.compressor.wkv.weight",    "block", None,   None,     ("2ID", "H"), "BF16", "indexer"),
    Row("attn.indexer.compressor.wgate.weight",  "block", None,   None,     ("2ID", "H"), "BF16", "indexer"),
    Row("attn.indexer.compressor.norm.weight",   "block", None,   None,     ("ID",), "BF16", "indexer"),
    Row("ffn.gate.weight",                       "block", None,   None,     ("E", "H")),
    Row("ffn.gate.tid2eid",                      "block", None,   None,     ("V", "K"), "I64", "hash"),
    Row("ffn.gate.bias",                         "block", None,   None,     ("E",), "F32", "bias_gate"),
    Row("ffn.experts.{}.w1.weight",              "block", EXPERT, "expert", ("MI", "H")),
    Row("ffn.experts.{}.w2.weight",              "block", EXPERT, "expert", ("H", "MI")),
    Row("ffn.experts.{}.w3.weight",              "block", EXPERT, "expert", ("MI", "H")),
    # one shared expert, replicated in the official layout (plain Linear, model.py:628)
    Row("ffn.shared_experts.w1.weight",          "block", None,   "fp8",    ("MI", "H")),
    Row("ffn.shared_experts.w2.weight",          "block", None,   "fp8",    ("H", "MI")),
    Row("ffn.shared_experts.w3.weight",          "block", None,   "fp8",    ("MI", "H")),
    # the MTP module's output side, after its block
    Row("norm.weight",                           "mtp",   None,   None,     ("H",)),
    Row("hc_head_fn",                            "mtp",   None,   None,     ("HC", "HCH"), "F32"),
    Row("hc_head_base",                          "mtp",   None,   None,     ("HC",), "F32"),
    Row("hc_head_scale",                         "mtp",   None,   None,     (1,), "F32"),
    # after the last layer
    Row("head.weight",                           "top",   0,      None,     ("V", "H")),
    Row("norm.weight",                           "top",   None,   None,     ("H",)),
    Row("hc_head_fn",                            "top",   None,   None,     ("HC", "HCH"), "F32"),
    Row("hc_head_base",                          "top",   None,   None,     ("HC",), "F32"),
    Row("hc_head_scale",                         "top",   None,   None,     (1,), "F32"),
)
# fmt: on


def dims(cfg: V4Config, layer: int | None = None) -> dict[str, int]:
    """The dimension names the table's shapes use, for one geometry (and layer: its compression ratio)."""
    nh, d, g = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    out = {
        "H": cfg.hidden_size,
        "V": cfg.vocab_size,
        "NH": nh,
        "D": d,
        "Q": cfg.q_lora_rank,
        "NHD": nh * d,
        "GR": g * cfg.o_lora_rank,
        "NHDG": nh * d // g,
        "E": cfg.n_routed_experts,
        "K": cfg.num_experts_per_tok,
        "MI": cfg.moe_intermediate_size,
        "HC": cfg.hc_mult,
        "HCH": cfg.hc_mult * cfg.hidden_size,
        "MIX": (2 + cfg.hc_mult) * cfg.hc_mult,
        "IH": cfg.index_n_heads,
        "ID": cfg.index_head_dim,
        "IHD": cfg.index_n_heads * cfg.index_head_dim,
        "2ID": 2 * cfg.index_head_dim,
    }
    if layer is not None:
        r = cfg.ratio(layer)
        out |= {"R": r, "CD": (2 if r == 4 else 1) * d}  # ratio 4 compresses overlapping windows: twice the width
    return out


def applies(cfg: V4Config, when: str | None, layer: int | None) -> bool:
    """Whether a row guarded by ``when`` exists in ``layer`` (a model layer id; MTP blocks follow the main layers)."""
    if when is None:
        return True
    assert layer is not None, when
    if when == "hash":
        return cfg.is_hash_layer(layer)
    if when == "bias_gate":
        return not cfg.is_hash_layer(layer)
    if when == "compressor":
        return cfg.ratio(layer) > 0
    if when == "indexer":
        return cfg.ratio(layer) == 4
    raise AssertionError(f"unknown table condition {when!r}")


# ---------------------------------------------------------------------- parsing
_TOP = {r.name: r for r in TABLE if r.scope == "top"}
_BLOCK = {r.name: r for r in TABLE if r.scope == "block" and "{}" not in r.name}
_MTP = {r.name: r for r in TABLE if r.scope == "mtp"}
_EXPERTS = {r.name.split(".")[-2]: r for r in TABLE if r.split == EXPERT}
_PREFIX_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


@dataclass(frozen=True)
class Name:
    """A V4 tensor name parsed into fields."""

    row: Row
    scale: bool = False  # the ``.scale`` of the row's weight
    index: int | None = None  # N of ``layers.N.`` or M of ``mtp.M.``; None at top level
    mtp: bool = False
    expert: int | None = None

    @property
    def split(self) -> int | str | None:
        return self.row.split

    @property
    def weight(self) -> str:
        """The name of the weight (for a scale: the weight it belongs to)."""
        path = self.row.name.replace("{}", str(self.expert)) if self.expert is not None else self.row.name
        if self.index is None:
            return path
        return f"{'mtp' if self.mtp else 'layers'}.{self.index}.{path}"

    @property
    def name(self) -> str:
        return scale_name(self.weight) if self.scale else self.weight

    def layer(self, cfg: V4Config) -> int | None:
        """The model layer id (``mtp.M`` is layer ``num_hidden_layers + M``); None at top level."""
        if self.index is None:
            return None
        return cfg.num_hidden_layers + self.index if self.mtp else self.index


def parse(name: str) -> Name:
    """Parse a V4 tensor name; ``UnknownNameError`` for anything outside the table."""
    base, is_scale = (name[: -len(SCALE)] + ".weight", True) if name.endswith(SCALE) else (name, False)
    m = _PREFIX_RE.match(base)
    if m is None:
        row, n = _TOP.get(base), None
        if row is not None:
            n = Name(row, is_scale)
    else:
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        em = _EXPERT_RE.match(rest)
        row = _EXPERTS[em.group(2)] if em else _BLOCK.get(rest) or (_MTP.get(rest) if kind == "mtp" else None)
        n = Name(row, is_scale, index, kind == "mtp", int(em.group(1)) if em else None) if row else None
    if n is None:
        raise UnknownNameError("not a DeepSeek-V4 tensor name (not in the V4 name table)", tensor=name)
    if is_scale and n.row.quant is None:
        raise UnknownNameError("a .scale on a tensor that is never quantized", tensor=name)
    return n


def scale_name(weight: str) -> str:
    """``<prefix>.weight`` -> ``<prefix>.scale``."""
    return weight.removesuffix(".weight") + SCALE


def is_scale(name: str) -> bool:
    return name.endswith(SCALE)


def weight_of(scale: str) -> str:
    return scale.removesuffix(SCALE) + ".weight"


# ---------------------------------------------------------------------- the expected tensor set
@dataclass(frozen=True)
class Format:
    """How a V4 checkpoint stores its weights: ``dense`` "fp8" or "bf16"; ``experts`` "fp4", "fp8" or "bf16";
    ``scale``: the dtype of the FP8 weights' 128x128 scales ("F8_E8M0", or "F32" on -Base)."""

    dense: str = "fp8"
    experts: str = "fp4"
    scale: str = "F8_E8M0"

    @property
    def label(self) -> str:
        if self.dense == "bf16" and self.experts == "bf16":
            return "BF16"
        s = "E8M0" if self.scale == "F8_E8M0" else "F32"
        return f"FP8 dense + {self.experts.upper()} experts, {s} scales"


@dataclass(frozen=True)
class Spec:
    """One expected tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: str | None = None  # the name of this weight's scale, when it has one


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 128x128 block grid of a 2-D weight (its FP8 scale's shape)."""
    return (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))


def _specs(cfg: V4Config, fmt: Format, n: Name) -> list[Spec]:
    """The tensors one row instance stores in ``fmt``: the weight and, when quantized, its scale."""
    layer = n.layer(cfg)
    size = dims(cfg, layer)
    shape = tuple(s if isinstance(s, int) else size[s] for s in n.row.shape)
    kind = n.row.quant
    name = n.weight
    sname = scale_name(name)
    as_fp8 = (kind == "fp8" and fmt.dense == "fp8") or (kind == "expert" and fmt.experts == "fp8")
    if as_fp8:
        return [Spec(name, shape, "F8_E4M3", sname), Spec(sname, grid(shape), fmt.scale)]
    if kind == "expert" and fmt.experts == "fp4":
        out, inp = shape
        return [Spec(name, (out, inp // 2), "I8", sname), Spec(sname, (out, inp // FP4_GROUP), "F8_E8M0")]
    return [Spec(name, shape, "BF16" if kind else n.row.dtype)]


def expected_tensors(cfg: V4Config, fmt: Format, *, mtp: bool = True) -> dict[str, Spec]:
    """Every tensor (weights and scales) a V4 checkpoint of ``cfg`` stored in ``fmt`` holds, in the table's order:
    the table expanded over the layers, the MTP blocks (with ``mtp``) and the routed experts."""
    out: dict[str, Spec] = {}

    def add(n: Name) -> None:
        for s in _specs(cfg, fmt, n):
            out[s.name] = s

    top = [r for r in TABLE if r.scope == "top"]
    block = [r for r in TABLE if r.scope != "top"]

    def expand(index: int, is_mtp: bool) -> None:
        layer = cfg.num_hidden_layers + index if is_mtp else index
        for r in block:
            if (r.scope == "mtp" and not is_mtp) or not applies(cfg, r.when, layer):
                continue
            if r.split != EXPERT:
                add(Name(r, False, index, is_mtp))
            elif r.name.endswith("w1.weight"):  # an expert's three rows together, expert by expert
                for e in range(cfg.n_routed_experts):
                    for w in ("w1", "w2", "w3"):
                        add(Name(_EXPERTS[w], False, index, is_mtp, e))

    add(Name(top[0]))
    for i in cfg.main_layers:
        expand(i, False)
    for r in top[1:]:
        add(Name(r))
    if mtp:
        for m in range(cfg.num_nextn_predict_layers):
            expand(m, True)
    return out


def is_mtp_name(name: str) -> bool:
    return name.startswith("mtp.")


# ---------------------------------------------------------------------- the model-parallel layout
def local_experts(cfg: V4Config, rank: int, world: int) -> range:
    """Routed experts owned by ``rank`` of ``world``: a contiguous block (model.py:616-625)."""
    per = cfg.n_routed_experts // world
    return range(rank * per, (rank + 1) * per)


def mp_spec(spec: Spec, n: Name, fmt: Format, world: int) -> Spec | None:
    """What a rank file holds of one expected HF tensor, after the official converter's post-processing
    (convert.py:134-149): ``wo_a`` dequantized to BF16 (its scale dropped); FP4 experts relabelled as safetensors
    ``F4`` with their logical shape [out, in] (same bytes); split tensors cut on their dim. None: not in rank files."""
    shape, dtype = spec.shape, spec.dtype
    if n.row.name == "attn.wo_a.weight" and fmt.dense == "fp8":
        if n.scale:
            return None
        dtype = "BF16"
    if not n.scale and dtype == "I8":
        shape, dtype = (shape[0], shape[1] * 2), "F4"
    if isinstance(n.split, int):
        shape = tuple(s // world if d == n.split else s for d, s in enumerate(shape))
    return Spec(spec.name, shape, dtype, spec.scale if dtype in ("F8_E4M3", "F4") else None)


def expected_mp_tensors(cfg: V4Config, fmt: Format, rank: int, world: int, *, mtp: bool = True) -> dict[str, Spec]:
    """The tensors of ``model{rank}-mp{world}.safetensors`` in the official V4 layout (names as in the HF folder; the
    MTP module in the rank files, as the official converter writes it). Assumes ``world`` is a valid degree."""
    out: dict[str, Spec] = {}
    experts = local_experts(cfg, rank, world)
    for spec in expected_tensors(cfg, fmt, mtp=mtp).values():
        n = parse(spec.name)
        if n.split == EXPERT and n.expert not in experts:
            continue
        s = mp_spec(spec, n, fmt, world)
        if s is not None:
            out[s.name] = s
    return out
