"""``inspect``: what a checkpoint is (layout, family, size) and every problem found in it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import names as N
from .checkpoint import open_checkpoint
from .config import ModelConfig
from .errors import ConfigError, UnknownNameError


def family(cfg: ModelConfig) -> str:
    """A best guess of the model family from its config."""
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
        try:
            layer = N.parse_hf(name).layer
        except UnknownNameError:
            layer = None
        part = "mtp" if (cfg and layer is not None and cfg.is_mtp_layer(layer)) else "main"
        for info in _unique_pieces(name, infos, ck.layout):
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            nbytes[part] += info.nbytes
            if not N.is_scale(name):
                params[part] += info.numel
    q = None
    if cfg is not None and cfg.quant is not None:
        q = f"fp8 {cfg.quant.fmt} {cfg.quant.block[0]}x{cfg.quant.block[1]}" + (
            f" ({cfg.quant.scale_fmt})" if cfg.quant.scale_fmt else ""
        )
    elif cfg is not None:
        q = "none (bf16)"
    return InspectReport(
        path=str(path),
        layout=ck.layout,
        world=ck.world,
        files=len(ck.files),
        family=family(cfg) if cfg else None,
        model_type=cfg.model_type if cfg else None,
        layers=cfg.num_hidden_layers if cfg else None,
        dense_layers=cfg.dense_layers if cfg else None,
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
    )


def _unique_pieces(name: str, infos: list, layout: str) -> list:
    """In the MP layout replicated tensors repeat in every rank file: count them once."""
    if layout != "mp" or len(infos) == 1:
        return infos
    try:
        split = N.parse_hf(name).split
    except UnknownNameError:
        return infos
    return infos if isinstance(split, int) else infos[:1]
