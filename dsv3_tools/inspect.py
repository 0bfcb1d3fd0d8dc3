"""``inspect``: what a checkpoint is (layout, family, size) and every problem found in it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import names as N
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ConfigError, UnknownNameError
from .family import AnyConfig, is_v4
from .v4 import names as V4
from .v4.validate import check_values, resolve_format
from .v4.validate import describe as describe_v4


def family(cfg: AnyConfig) -> str:
    """A best guess of the model family from its config."""
    if is_v4(cfg):
        return cfg.family
    if cfg.model_type == "deepseek_v32":
        return "DeepSeek-V3.2"
    if cfg.model_type == "kimi_k2" or cfg.n_routed_experts == 384:
        return "Kimi-K2"
    if cfg.model_type == "deepseek_v2":
        return "DeepSeek-V2-Lite" if not cfg.has_q_lora else "DeepSeek-V2"
    if cfg.quant is not None and cfg.quant.scale_fmt == "ue8m0":
        return "DeepSeek-V3.1"
    return "DeepSeek-V3"


@dataclass
class InspectReport:
    path: str
    layout: str
    world: int
    files: int
    family: str | None
    model_type: str | None
    layers: int | None
    dense_layers: list[int] | None
    mtp_layers: list[int]
    experts: int | None
    experts_per_token: int | None
    quantization: str | None
    dtypes: dict[str, int]
    tensors: int
    params_main: int
    params_mtp: int
    bytes_main: int
    bytes_mtp: int
    file_bytes: int
    problems: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    variant: str | None = None  # DeepSeek-V4: the release the storage format matches (instruct FP4, -Base FP8, ...)
    layer_kinds: dict[str, int] | None = None  # DeepSeek-V4: layers per attention kind, hash-routed layers

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def inspect_checkpoint(path: str | Path) -> InspectReport:
    """Open ``path`` leniently and describe it; problems are collected, not raised.

    Raises ``LayoutError`` (bad input) only when ``path`` is not a checkpoint folder at all.
    """
    config_problem: list[dict] = []
    try:
        ck = open_checkpoint(path, strict=False)
    except ConfigError as e:
        config_problem.append({"kind": "config", "file": "config.json", "tensor": None, "message": str(e)})
        ck = open_checkpoint(path, strict=False, read_config=False)
    cfg = ck.config
    problems = config_problem + [p.as_dict() for p in ck.problems]
    v4 = describe_v4(cfg, resolve_format(cfg, ck.tensors)) if is_v4(cfg) else {}
    if v4:
        problems += check_values(ck)  # reads the scales: decoded values finite, hash routing ids in range
    if cfg is None and not config_problem:
        problems.append(
            {
                "kind": "config",
                "file": "config.json",
                "tensor": None,
                "message": "no config.json: names, shapes and dtypes cannot be checked",
            }
        )
    params = {"main": 0, "mtp": 0}
    nbytes = {"main": 0, "mtp": 0}
    dtypes: dict[str, int] = {}
    for name in ck.tensors:
        parts = ck.mp_parts.get(name) if ck.layout == "mp" else None
        infos = [p.info for p in parts] if parts else [ck.tensors[name]]
        part = "mtp" if cfg is not None and _is_mtp(cfg, name) else "main"
        for info in _unique_pieces(ck, name, infos):
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            nbytes[part] += info.nbytes
            if not (V4.is_scale(name) if v4 else N.is_scale(name)):
                params[part] += info.numel * (2 if v4 and info.dtype == "I8" else 1)  # I8 experts: two FP4 a byte
    q = v4.get("quantization")
    if cfg is not None and not v4:
        q = "none (bf16)"
        if cfg.quant is not None:
            q = f"fp8 {cfg.quant.fmt} {cfg.quant.block[0]}x{cfg.quant.block[1]}" + (
                f" ({cfg.quant.scale_fmt})" if cfg.quant.scale_fmt else ""
            )
    return InspectReport(
        path=str(path),
        layout=ck.layout,
        world=ck.world,
        files=len(ck.files),
        family=v4.get("family") or (family(cfg) if cfg else None),
        model_type=cfg.model_type if cfg else None,
        layers=cfg.num_hidden_layers if cfg else None,
        dense_layers=(cfg.dense_layers if not v4 else []) if cfg else None,
        mtp_layers=list(cfg.mtp_layers) if cfg else [],
        experts=cfg.n_routed_experts if cfg else None,
        experts_per_token=cfg.num_experts_per_tok if cfg else None,
        quantization=q,
        dtypes=dict(sorted(dtypes.items())),
        tensors=len(ck.tensors),
        params_main=params["main"],
        params_mtp=params["mtp"],
        bytes_main=nbytes["main"],
        bytes_mtp=nbytes["mtp"],
        file_bytes=ck.total_bytes(),
        problems=problems,
        warnings=list(ck.warnings),
        variant=v4.get("variant"),
        layer_kinds=v4.get("layer_kinds"),
    )


def _is_mtp(cfg: AnyConfig, name: str) -> bool:
    if is_v4(cfg):
        return name.startswith("mtp.")
    try:
        layer = N.parse_hf(name).layer
    except UnknownNameError:
        return False
    return layer is not None and cfg.is_mtp_layer(layer)


def _unique_pieces(ck: Checkpoint, name: str, infos: list) -> list:
    """In the MP layout replicated tensors repeat in every rank file: count them once."""
    if ck.layout != "mp" or len(infos) == 1:
        return infos
    try:
        split = ck.split_of(name)
    except UnknownNameError:
        return infos
    return infos if isinstance(split, int) else infos[:1]
