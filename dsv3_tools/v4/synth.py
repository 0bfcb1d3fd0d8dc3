"""Synthetic DeepSeek-V4 checkpoints in the exact released format, for tests, demos and benchmarks.

The file layout of the released repos (docs/format-v4.md 1): ``embed.weight`` alone in the first file, one file per
layer, then ``head``, ``norm`` and ``hc_head_*``, then the MTP module, named ``model-00001-of-00046.safetensors``
(five-digit total) with ``model.safetensors.index.json``. Storage formats (``dtype``):

- ``fp4`` (V4-Flash / -Pro): dense weights F8_E4M3 with F8_E8M0 128x128 scales (ue8m0 rule), routed experts FP4
  packed in I8 with F8_E8M0 1x32 scales (``kernels.fp4.quant_fp4_ref``: the official FP4 rule);
- ``fp8`` (-Base, per two non-official sources): experts FP8 too, and every scale F32 (amax / 448);
- ``bf16``: no quantization.

Weights have realistic magnitudes (fan-in scaled, a different magnitude per 128x128 block and per 32-wide group so
that a scale applied to the wrong block shows); ``tid2eid`` holds distinct expert ids per token. Same seed, same
bytes; one tensor in memory at a time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dsv3_tools.kernels.fp4 import GROUP, f32_to_e8m0, quant_fp4_ref
from dsv3_tools.kernels.weight_quant import weight_quant_ref

from ..config import QuantConfig
from ..errors import ConfigError
from ..layout import INDEX_NAME
from ..tokenizer_files import write_tokenizer_files
from ..writer import SafetensorsWriter, write_json_atomic
from . import names as V
from .config import V4Config

DTYPES = ("fp4", "fp8", "bf16")
FORMATS = {
    "fp4": V.Format("fp8", "fp4", "F8_E8M0"),
    "fp8": V.Format("fp8", "fp8", "F32"),
    "bf16": V.Format("bf16", "bf16", "F8_E8M0"),
}


def derive_config(
    cfg: V4Config, *, dtype: str | None, layers: int | None, experts: int | None, mtp: int | None
) -> tuple[V4Config, str]:
    """The geometry and storage format synth writes: ``cfg`` at the requested depth, expert count and format
    (``None``: the config's own, FP8 experts when it says ``expert_dtype: fp8``, else FP4)."""
    if layers is not None:
        if layers < 1:
            raise ConfigError("--layers must be >= 1")
        if layers > cfg.num_hidden_layers:
            raise ConfigError(f"--layers {layers} exceeds the config's {cfg.num_hidden_layers}")
        cfg = cfg.with_layers(layers, mtp)
    elif mtp is not None:
        cfg = cfg.with_layers(cfg.num_hidden_layers, mtp)
    if experts is not None:
        if experts < 1:
            raise ConfigError("--experts must be >= 1")
        cfg = cfg.with_experts(experts)
    dtype = dtype or ("fp8" if cfg.expert_dtype == "fp8" else "fp4")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype for DeepSeek-V4 must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp4":
        expert_dtype = None if cfg.expert_dtype is None else "fp4"
        cfg = replace(cfg, quant=QuantConfig(scale_fmt="ue8m0"), expert_dtype=expert_dtype)
    elif dtype == "fp8":
        cfg = replace(cfg, quant=QuantConfig(scale_fmt=None), expert_dtype="fp8")
    else:
        cfg = replace(cfg, quant=None, expert_dtype=None)
    return V4Config.from_dict(cfg.to_hf_dict()), dtype


def file_name(i: int, k: int) -> str:
    """The released repos' shard names: ``model-00001-of-00046.safetensors``."""
    return f"model-{i + 1:05d}-of-{k:05d}.safetensors"


def plan_files(cfg: V4Config, fmt: V.Format) -> list[list[V.Spec]]:
    """The released layout: embed; one file per layer; head, norm, hc_head; the MTP module."""
    specs = V.expected_tensors(cfg, fmt)
    files: dict[str, list[V.Spec]] = {}
    for s in specs.values():
        n = V.parse(s.name)
        key = "embed" if s.name == "embed.weight" else "mtp" if n.mtp else "top" if n.index is None else n.index
        files.setdefault(str(key), []).append(s)
    order = ["embed", *(str(i) for i in cfg.main_layers), "top", "mtp"]
    return [files[k] for k in order if k in files]


def _gen(seed: int, name: str) -> torch.Generator:
    import zlib

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def master_weight(cfg: V4Config, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full-precision value synth stores for a weight or parameter ``name`` of logical ``shape``."""
    g = _gen(seed, name)
    n = V.parse(name)
    row = n.row.name
    if row == "embed.weight":
        return torch.randn(shape, generator=g)
    if row.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1 or row.endswith("ape") or row.startswith("hc_"):
        return 0.1 * torch.randn(shape, generator=g)
    w = torch.randn(shape, generator=g) / shape[1] ** 0.5
    if n.row.quant:
        # a different magnitude per 128x128 block, and (experts) per 32-wide group: a misplaced scale shows
        gm, gn = -(-shape[0] // 128), -(-shape[1] // 128)
        f = torch.exp2(torch.rand((gm, gn), generator=g) * 4 - 2)
        w = w * f.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
        if n.row.quant == "expert" and shape[1] % GROUP == 0:
            w = w * torch.exp2(torch.rand((shape[0], shape[1] // GROUP), generator=g) * 2 - 1).repeat_interleave(
                GROUP, 1
            )
    return w


def _tid2eid(cfg: V4Config, name: str, seed: int) -> torch.Tensor:
    """For each token, ``num_experts_per_tok`` distinct expert ids (I64, as on disk)."""
    g = _gen(seed, name)
    ids = torch.rand((cfg.vocab_size, cfg.n_routed_experts), generator=g).argsort(dim=1)
    return ids[:, : cfg.num_experts_per_tok].contiguous().to(torch.int64)


def tensors_of(cfg: V4Config, fmt: V.Format, spec: V.Spec, seed: int) -> dict[str, torch.Tensor]:
    """The stored tensor(s) of one expected weight: itself, and its scale when it has one."""
    n = V.parse(spec.name)
    if spec.dtype == "I64":
        return {spec.name: _tid2eid(cfg, spec.name, seed)}
    if spec.dtype == "I8":  # FP4 experts: the logical shape is twice the packed width
        packed, scale = quant_fp4_ref(master_weight(cfg, spec.name, (spec.shape[0], spec.shape[1] * 2), seed))
        return {spec.name: packed, spec.scale: scale.view(torch.float8_e8m0fnu)}
    if spec.dtype == "F8_E4M3":
        e8m0 = fmt.scale == "F8_E8M0"
        q, s = weight_quant_ref(master_weight(cfg, spec.name, spec.shape, seed), (128, 128), "ue8m0" if e8m0 else None)
        return {spec.name: q, spec.scale: f32_to_e8m0(s).view(torch.float8_e8m0fnu) if e8m0 else s}
    dt = {"BF16": torch.bfloat16, "F32": torch.float32}[spec.dtype]
    return {spec.name: master_weight(cfg, n.weight, spec.shape, seed).to(dt)}


def run(out: Path, cfg: V4Config, fmt: V.Format, seed: int, files: list[list[V.Spec]], progress=None) -> tuple:
    """Write the checkpoint (one tensor and its scale in memory at a time); returns (files, tensors, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    k = len(files)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(files):
        fname = file_name(i, k)
        w = SafetensorsWriter(out / fname, [(s.name, s.dtype, s.shape) for s in group], {"format": "pt"})
        try:
            pending: dict[str, torch.Tensor] = {}
            for spec in group:
                if spec.name not in pending:
                    pending |= tensors_of(cfg, fmt, spec if not V.is_scale(spec.name) else _weight(group, spec), seed)
                t = pending.pop(spec.name)
                w.write(spec.name, t)
                weight_map[spec.name] = fname
                total += t.numel() * t.element_size()
                if progress:
                    progress(t.numel() * t.element_size())
            w.finish()
        except BaseException:
            w.abort()
            raise
    write_json_atomic(
        out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    )
    write_json_atomic(out / "config.json", cfg.to_hf_dict())
    write_tokenizer_files(out, cfg)
    return k, len(weight_map), total


def _weight(group: list[V.Spec], scale: V.Spec) -> V.Spec:
    w = V.weight_of(scale.name)
    return next(s for s in group if s.name == w)
