"""Synthetic checkpoints in the exact Hugging Face format of the family, for tests, the demo and benchmarks.

Weights have realistic magnitudes (fan-in scaled, with a different magnitude per 128x128 block so that scale
mistakes show), FP8 weights are block-quantized by the reference quantizer, at least one scale is stored in
a different file from its weight, and the folder carries config, an index with ``total_size`` and the family's
tokenizer files (``tokenizer_files.py``: a small byte-level BPE, the chat template, the generation config). Same
seed, same bytes. Tensors are generated and written one at a time, so memory stays at one tensor even for real V3
shapes.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from . import names as N
from .config import ModelConfig, QuantConfig
from .disk import check_destination
from .errors import ConfigError, OutputError
from .family import AnyConfig, is_v4, load_config
from .layout import INDEX_NAME
from .stfile import nbytes
from .tokenizer_files import write_tokenizer_files
from .v4.config import V4Config
from .writer import SafetensorsWriter, write_json_atomic

# The released V3.1's block scales are powers of two except self_attn.o_proj's, which carry this mantissa
# (sqrt(7/4); DeepSeek-V3 issue 961): `--scale-fmt v3.1` writes them that way.
V31_O_PROJ_MANTISSA = 1.3228756555322954
SCALE_FMTS = (None, "ue8m0", "v3.1")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class SynthReport:
    path: str
    files: int
    tensors: int
    bytes: int
    dtype: str
    config: str


def derive_config(
    cfg: ModelConfig,
    *,
    dtype: str = "fp8",
    scale_fmt: str | None = None,
    layers: int | None = None,
    experts: int | None = None,
    mtp: int | None = None,
    dense_layers: int | None = None,
) -> ModelConfig:
    """The geometry synth writes: ``cfg`` at the requested dtype, depth, number of dense layers and expert count."""
    if scale_fmt not in SCALE_FMTS:
        raise ConfigError(f"--scale-fmt must be ue8m0 or v3.1, got {scale_fmt!r}")
    if scale_fmt == "v3.1":
        scale_fmt = "ue8m0"  # what the config says; the o_proj exception is in the scales themselves
    if layers is not None:
        if layers < 1:
            raise ConfigError("--layers must be >= 1")
        cfg = cfg.with_layers(layers, mtp)
    elif mtp is not None:
        cfg = replace(cfg, num_nextn_predict_layers=mtp)
    if dense_layers is not None:
        if not 0 <= dense_layers <= cfg.num_hidden_layers:
            raise ConfigError(f"--dense-layers must be between 0 and the {cfg.num_hidden_layers} layers")
        cfg = replace(cfg, first_k_dense_replace=dense_layers)
    if experts is not None:
        if experts < 1:
            raise ConfigError("--experts must be >= 1")
        groups = cfg.n_group if experts % cfg.n_group == 0 and experts // cfg.n_group >= 2 else 1
        cfg = replace(
            cfg,
            n_routed_experts=experts,
            n_group=groups,
            topk_group=min(cfg.topk_group, groups),
            num_experts_per_tok=min(cfg.num_experts_per_tok, experts),
        )
    if dtype == "fp8":
        block = cfg.quant.block if cfg.quant else (128, 128)
        cfg = replace(
            cfg, quant=QuantConfig(block=block, scale_fmt=scale_fmt or (cfg.quant.scale_fmt if cfg.quant else None))
        )
    elif dtype == "bf16":
        if scale_fmt:
            raise ConfigError("--scale-fmt applies to --dtype fp8 only")
        cfg = replace(cfg, quant=None)
    else:
        raise ConfigError(f"--dtype must be fp8 or bf16, got {dtype!r}")
    # Re-run the config's own checks on the derived geometry.
    return ModelConfig.from_dict(cfg.to_hf_dict())


def _gen(seed: int, name: str) -> torch.Generator:
    import torch

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def master_weight(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full-precision value synth stores for ``name`` (before any FP8 quantization)."""
    import torch

    g = _gen(seed, name)
    n = N.parse_hf(name)
    leaf, hf = n.leaf, n.module.hf
    if leaf == "e_score_correction_bias":
        return (torch.randn(shape, generator=g) * 0.05).float()
    if len(shape) == 1:  # norms (and the indexer LayerNorm bias)
        if leaf == "bias":
            return torch.randn(shape, generator=g) * 0.02
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if hf.endswith("embed_tokens"):
        return torch.randn(shape, generator=g)
    fan_in = shape[1]
    w = torch.randn(shape, generator=g) / fan_in**0.5
    if n.module.quantized:
        # A different magnitude per 128x128 block, so that a scale applied to the wrong block shows.
        b0, b1 = cfg.block_size
        gm, gn = -(-shape[0] // b0), -(-shape[1] // b1)
        f = torch.exp2(torch.rand((gm, gn), generator=g) * 2 - 1)
        w = w * f.repeat_interleave(b0, 0)[: shape[0]].repeat_interleave(b1, 1)[:, : shape[1]]
    return w


def _plan_files(specs: list[N.TensorSpec], shards: int) -> list[list[N.TensorSpec]]:
    """Split tensors into ``shards`` files by bytes, keeping order; then move one scale to the next file."""
    sizes = [nbytes(s.dtype, s.shape) for s in specs]
    total = sum(sizes)
    files: list[list[N.TensorSpec]] = [[] for _ in range(shards)]
    acc = 0
    for spec, size in zip(specs, sizes):
        idx = min(shards - 1, acc * shards // max(total, 1))
        files[idx].append(spec)
        acc += size
    files = [f for f in files if f]
    if len(files) > 1:
        # Real V3 files put some weights and their scales in different files: do the same on purpose.
        for i in range(len(files) - 1):
            last_w = [s for s in files[i] if s.scale and any(t.name == s.scale for t in files[i])]
            if last_w:
                w = last_w[-1]
                sc = next(t for t in files[i] if t.name == w.scale)
                files[i].remove(sc)
                files[i + 1].insert(0, sc)
                break
    return files


def shard_file_name(i: int, k: int) -> str:
    return f"model-{i + 1:05d}-of-{k:06d}.safetensors"


@dataclass(frozen=True)
class SynthPlan:
    """What ``synth`` will write: the derived geometry, the tensors per file, the bytes."""

    out: Path
    cfg: ModelConfig
    dtype: str
    seed: int
    files: list[list[N.TensorSpec]]
    o_proj_mantissa: float | None = None  # --scale-fmt v3.1: o_proj's scales times this (not powers of two)

    @property
    def bytes(self) -> int:
        return sum(nbytes(s.dtype, s.shape) for f in self.files for s in f)


def plan_synth(
    out: str | Path,
    config: str | AnyConfig = "tiny",
    *,
    dtype: str | None = None,
    seed: int = 0,
    shards: int = 4,
    layers: int | None = None,
    experts: int | None = None,
    mtp: int | None = None,
    scale_fmt: str | None = None,
    dense_layers: int | None = None,
) -> SynthPlan:
    """Plan a synthetic checkpoint of ``config`` in the new folder ``out`` (checked, nothing written).

    ``dtype``: fp8 (default) or bf16 for the V3 family; for DeepSeek-V4 fp4 (the release: FP4 experts), fp8 (-Base:
    FP8 experts, F32 scales) or bf16, by default the config's own. V4 folders take the released file layout (one
    file per layer), whatever ``shards`` says.
    """
    base = config if isinstance(config, (ModelConfig, V4Config)) else load_config(config)
    if shards < 1:
        raise ConfigError("--shards must be >= 1")
    out = Path(out)
    check_destination(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out} is not empty")
    if is_v4(base):
        from .v4 import synth as v4_synth

        if scale_fmt is not None or dense_layers is not None:
            raise ConfigError("--scale-fmt and --dense-layers apply to the V3 family, not to DeepSeek-V4")
        cfg, dtype = v4_synth.derive_config(base, dtype=dtype, layers=layers, experts=experts, mtp=mtp)
        return SynthPlan(out, cfg, dtype, seed, v4_synth.plan_files(cfg, v4_synth.FORMATS[dtype]))
    dtype = dtype or "fp8"
    cfg = derive_config(
        base, dtype=dtype, scale_fmt=scale_fmt, layers=layers, experts=experts, mtp=mtp, dense_layers=dense_layers
    )
    files = _plan_files(list(N.expected_tensors(cfg).values()), shards)
    return SynthPlan(out, cfg, dtype, seed, files, V31_O_PROJ_MANTISSA if scale_fmt == "v3.1" else None)


def synth(
    out: str | Path,
    config: str | AnyConfig = "tiny",
    *,
    dtype: str | None = None,
    seed: int = 0,
    shards: int = 4,
    layers: int | None = None,
    experts: int | None = None,
    mtp: int | None = None,
    scale_fmt: str | None = None,
    dense_layers: int | None = None,
    progress: Progress | None = None,
) -> SynthReport:
    """Write a synthetic checkpoint of ``config`` into the new folder ``out``."""
    plan = plan_synth(
        out, config, dtype=dtype, seed=seed, shards=shards, layers=layers, experts=experts, mtp=mtp,
        scale_fmt=scale_fmt, dense_layers=dense_layers,
    )  # fmt: skip
    return run_synth(plan, progress)


def _quantized(plan: SynthPlan, spec: N.TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's FP8 values and block scales (with ``--scale-fmt v3.1``, o_proj's scales off powers of two)."""
    from .kernels.weight_quant import quantize_with_scales, weight_quant_ref

    cfg = plan.cfg
    x = master_weight(cfg, spec.name, spec.shape, plan.seed)
    q, s = weight_quant_ref(x, cfg.block_size, cfg.quant.scale_fmt)
    if plan.o_proj_mantissa is not None and spec.name.endswith("self_attn.o_proj.weight"):
        s = s * plan.o_proj_mantissa
        q = quantize_with_scales(x, s, cfg.block_size)
    return q, s


def run_synth(plan: SynthPlan, progress: Progress | None = None) -> SynthReport:
    """Write ``plan``'s checkpoint, tensor by tensor (memory: one tensor)."""
    import torch

    out, cfg, seed, files = plan.out, plan.cfg, plan.seed, plan.files
    if is_v4(cfg):
        from .v4 import synth as v4_synth

        k, count, total = v4_synth.run(out, cfg, v4_synth.FORMATS[plan.dtype], seed, files, progress)
        _write_notes(out, cfg.model_type, seed, plan.dtype)
        return SynthReport(str(out), k, count, total, plan.dtype, cfg.model_type)
    out.mkdir(parents=True, exist_ok=True)
    specs = [s for f in files for s in f]
    k = len(files)
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}  # scales computed with their weight but stored in a later file
    for i, group in enumerate(files):
        fname = shard_file_name(i, k) if k > 1 else "model.safetensors"
        w = SafetensorsWriter(out / fname, [(s.name, s.dtype, s.shape) for s in group], {"format": "pt"})
        try:
            for spec in group:
                if spec.name in pending:
                    t = pending.pop(spec.name)
                elif spec.dtype == "F8_E4M3":
                    t, pending[spec.scale] = _quantized(plan, spec)
                elif N.is_scale(spec.name):
                    _, t = _quantized(plan, next(x for x in specs if x.name == N.weight_of(spec.name)))
                else:
                    dt = torch.float32 if spec.dtype == "F32" else torch.bfloat16
                    t = master_weight(cfg, spec.name, spec.shape, seed).to(dt)
                w.write(spec.name, t)
                weight_map[spec.name] = fname
                nbytes = t.numel() * t.element_size()
                total += nbytes
                if progress:
                    progress(nbytes)
            w.finish()
        except BaseException:
            w.abort()
            raise
    if k > 1:
        write_json_atomic(
            out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        )
    write_json_atomic(out / "config.json", cfg.to_hf_dict())
    write_tokenizer_files(out, cfg)
    _write_notes(out, cfg.model_type, seed, plan.dtype)
    return SynthReport(str(out), k, len(specs), total, plan.dtype, cfg.model_type)


def _write_notes(out: Path, model_type: str, seed: int, dtype: str) -> None:
    (out / "README.md").write_text(
        f"# Synthetic {model_type} checkpoint\n\nWritten by `dsv3-tools synth` (seed {seed}, {dtype}). Random weights.\n"
    )
    (out / "LICENSE").write_text("Synthetic weights generated by dsv3-tools; no rights reserved.\n")


def folder_digest(path: str | Path) -> str:
    """sha256 over every file's name and bytes (tests: same seed, same bytes)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
