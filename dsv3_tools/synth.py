"""Synthetic checkpoints in the exact Hugging Face format of the family, for tests, the demo and benchmarks.

Weights have realistic magnitudes (fan-in scaled, with a different magnitude per 128x128 block so that scale
mistakes show), FP8 weights are block-quantized by the reference quantizer, at least one scale is stored in
a different file from its weight, and the folder carries config, an index with ``total_size`` and the family's
tokenizer files (``tokenizer_files.py``: a small byte-level BPE, the chat template, the generation config). Same
seed, same bytes. Tensors are generated and written one at a time, so memory stays at one tensor even for real V3
shapes.
"""

from __future__ import annotations

import functools
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
    profile: str = "random"


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


def master_weight(
    cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int, profile: str = "random"
) -> torch.Tensor:
    """The full-precision value synth stores for ``name`` (before any FP8 quantization), in ``profile``'s style."""
    import torch

    if profile == "trained":
        return _trained_weight(cfg, name, shape, seed)
    if profile != "random":
        raise ConfigError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
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
    return _block_magnitudes(cfg, w, g) if n.module.quantized else w


def _block_magnitudes(cfg: ModelConfig, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``w`` with a different magnitude (2^-1 .. 2^1) per 128x128 block, so that a scale applied to the wrong
    block shows."""
    import torch

    b0, b1 = cfg.block_size
    gm, gn = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
    f = torch.exp2(torch.rand((gm, gn), generator=g) * 2 - 1)
    return w * f.repeat_interleave(b0, 0)[: w.shape[0]].repeat_interleave(b1, 1)[:, : w.shape[1]]


# ---------------------------------------------------------------------- the "trained" profile
# Random weights make a chaotic network: every residual branch is as large as the residual stream, so errors
# compound from layer to layer, and the router's scores of chosen and unchosen experts are continuous random values,
# so a rounding-sized change flips choices at near-ties. A trained network is stable for reasons that can be
# built in directly: each branch adds a small update to the residual stream, norms stay near 1, the router
# separates chosen from unchosen experts by a clear margin, and attention logits stay moderate. The "trained"
# profile builds them in:
# - every token's embedding is a shared direction u_0, a routing "code" direction u_c (one of C, per token id)
#   and a token-specific random part (fractions BETA0, BETA, the rest); u_0..u_C are orthonormal (disjoint random
#   supports, so exactly orthonormal on every machine);
# - each router row reads only u_0 and the codes: for a token of code c its logit is -LOGIT_OFF, plus LOGIT_ON
#   (+- 0.5) for the k experts chosen for code c in that layer, spread over topk_group groups, so chosen and
#   unchosen experts (and groups) differ by ~LOGIT_ON in logit whatever the rest of the hidden state holds;
# - output projections (o_proj, every down_proj) are scaled by BRANCH, so each branch adds ~10-20% of the residual;
# - norms are 1 +- 2%, the router bias +- 1%, q_b_proj scaled by Q_SCALE (attention logits of std ~1);
# - the MTP module's eh_proj passes its hidden-state half through (0.95 I) so the token's code reaches its router.
PROFILES = ("random", "trained")
BETA0, BETA = 0.4, 0.6
LOGIT_OFF, LOGIT_ON = 2.5, 4.0
BRANCH, Q_SCALE = 0.15, 0.7


def n_codes(cfg: ModelConfig) -> int:
    """Routing codes of the trained profile: enough that every expert is chosen for some code (C * k >= 2 E)."""
    return min(max(8, -(-2 * cfg.n_routed_experts // max(cfg.num_experts_per_tok, 1))), cfg.hidden_size // 8)


@functools.lru_cache(maxsize=4)
def routing_basis(seed: int, hidden: int, vocab: int, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [hidden, codes + 1]: orthonormal columns on disjoint random supports, u_0 first; each token id's code)."""
    import torch

    g = _gen(seed, "profile.trained.basis")
    perm = torch.randperm(hidden, generator=g)
    sign = torch.randint(0, 2, (hidden,), generator=g).float() * 2 - 1
    U = torch.zeros(hidden, codes + 1)
    for j, idx in enumerate(perm.tensor_split(codes + 1)):
        U[idx, j] = sign[idx] / len(idx) ** 0.5
    return U, torch.randint(0, codes, (vocab,), generator=g)


def chosen_experts(cfg: ModelConfig, g: torch.Generator) -> list[int]:
    """k experts spread as evenly as possible over topk_group random groups (at most a group's size from each)."""
    import torch

    E, G, k, tg = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok, cfg.topk_group
    per = E // G
    groups = torch.randperm(G, generator=g)[:tg].tolist()
    counts = [min(per, k // tg + (i < k % tg)) for i in range(tg)]
    for i in range(tg):  # spill what a full group could not take
        while sum(counts) < k and counts[i] < per:
            counts[i] += 1
    out = []
    for grp, n in zip(groups, counts):
        out += (torch.randperm(per, generator=g)[:n] + grp * per).tolist()
    return out


def _trained_weight(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    import torch

    g = _gen(seed, name)
    n = N.parse_hf(name)
    leaf, hf = n.leaf, n.module.hf
    H = cfg.hidden_size
    if leaf == "e_score_correction_bias":
        return (torch.randn(shape, generator=g) * 0.01).float()
    if len(shape) == 1:
        return torch.randn(shape, generator=g) * 0.02 + (0.0 if leaf == "bias" else 1.0)
    C = n_codes(cfg)
    U, codes = routing_basis(seed, H, cfg.vocab_size, C)
    if hf.endswith("embed_tokens"):
        gamma = (1 - BETA0**2 - BETA**2) ** 0.5
        out = torch.randn(shape, generator=g) * gamma
        for lo in range(0, shape[0], 8192):  # row chunks: the code columns of a 129280-row vocabulary at once are GBs
            c = codes[lo : lo + 8192]
            out[lo : lo + len(c)] += H**0.5 * (BETA0 * U[:, 0] + BETA * U[:, 1 + c].T)
        return out
    if hf == "mlp.gate":
        coef = torch.zeros(shape[0], C + 1)
        coef[:, 0] = -LOGIT_OFF / BETA0
        for c in range(C):
            picks = chosen_experts(cfg, g)
            coef[picks, 1 + c] = (LOGIT_ON + torch.rand(len(picks), generator=g) - 0.5) / BETA
        return (coef @ U.T + 0.1 * torch.randn(shape, generator=g)) / H**0.5
    if hf == "eh_proj":  # [H, 2H] over cat(enorm(embedding), hnorm(hidden)): the hidden half passes through
        w = torch.randn(shape, generator=g) * (0.3 / H**0.5)
        w[:, H:] = 0.95 * torch.eye(H) + w[:, H:] * 0.1
        return w
    w = torch.randn(shape, generator=g) / shape[1] ** 0.5
    if hf.endswith("o_proj") or hf.endswith("down_proj"):
        w = w * BRANCH
    elif hf.endswith("q_b_proj") or hf.endswith("q_proj"):
        w = w * Q_SCALE
    return _block_magnitudes(cfg, w, g) if n.module.quantized else w


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
    profile: str = "random"

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
    profile: str = "random",
) -> SynthPlan:
    """Plan a synthetic checkpoint of ``config`` in the new folder ``out`` (checked, nothing written).

    ``dtype``: fp8 (default) or bf16 for the V3 family; for DeepSeek-V4 fp4 (the release: FP4 experts), fp8 (-Base:
    FP8 experts, F32 scales) or bf16, by default the config's own. V4 folders take the released file layout (one
    file per layer), whatever ``shards`` says.

    ``profile`` (V3 family): ``random`` (fan-in scaled Gaussian weights: a chaotic network, the harsh case for
    ``verify``) or ``trained`` (the properties that keep a trained network stable built in; see the profile's notes
    above).
    """
    if profile not in PROFILES:
        raise ConfigError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    base = config if isinstance(config, (ModelConfig, V4Config)) else load_config(config)
    if shards < 1:
        raise ConfigError("--shards must be >= 1")
    out = Path(out)
    check_destination(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out} is not empty")
    if is_v4(base):
        from .v4 import synth as v4_synth

        if scale_fmt is not None or dense_layers is not None or profile != "random":
            raise ConfigError("--scale-fmt, --dense-layers and --profile apply to the V3 family, not to DeepSeek-V4")
        cfg, dtype = v4_synth.derive_config(base, dtype=dtype, layers=layers, experts=experts, mtp=mtp)
        return SynthPlan(out, cfg, dtype, seed, v4_synth.plan_files(cfg, v4_synth.FORMATS[dtype]))
    dtype = dtype or "fp8"
    cfg = derive_config(
        base, dtype=dtype, scale_fmt=scale_fmt, layers=layers, experts=experts, mtp=mtp, dense_layers=dense_layers
    )
    files = _plan_files(list(N.expected_tensors(cfg).values()), shards)
    mantissa = V31_O_PROJ_MANTISSA if scale_fmt == "v3.1" else None
    return SynthPlan(out, cfg, dtype, seed, files, mantissa, profile)


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
    profile: str = "random",
    progress: Progress | None = None,
) -> SynthReport:
    """Write a synthetic checkpoint of ``config`` into the new folder ``out``."""
    plan = plan_synth(
        out, config, dtype=dtype, seed=seed, shards=shards, layers=layers, experts=experts, mtp=mtp,
        scale_fmt=scale_fmt, dense_layers=dense_layers, profile=profile,
    )  # fmt: skip
    return run_synth(plan, progress)


def _quantized(plan: SynthPlan, spec: N.TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's FP8 values and block scales (with ``--scale-fmt v3.1``, o_proj's scales off powers of two)."""
    from .kernels.weight_quant import quantize_with_scales, weight_quant_ref

    cfg = plan.cfg
    x = master_weight(cfg, spec.name, spec.shape, plan.seed, plan.profile)
    q, s = weight_quant_ref(x, cfg.block_size, cfg.quant.scale_fmt)
    if plan.o_proj_mantissa is not None and spec.name.endswith("self_attn.o_proj.weight"):
        s = s * plan.o_proj_mantissa
        q = quantize_with_scales(x, s, cfg.block_size)
    return q, s


def run_synth(plan: SynthPlan, progress: Progress | None = None) -> SynthReport:
    """Write ``plan``'s checkpoint, tensor by tensor (memory: one tensor)."""
    import torch

    out, cfg, seed, files, profile = plan.out, plan.cfg, plan.seed, plan.files, plan.profile
    if is_v4(cfg):
        from .v4 import synth as v4_synth

        k, count, total = v4_synth.run(out, cfg, v4_synth.FORMATS[plan.dtype], seed, files, progress)
        _write_notes(out, cfg.model_type, seed, plan.dtype, profile)
        return SynthReport(str(out), k, count, total, plan.dtype, cfg.model_type, profile)

    def value(spec: N.TensorSpec) -> torch.Tensor:
        return master_weight(cfg, spec.name, spec.shape, seed, profile)

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
                    t = value(spec).to(dt)
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
    _write_notes(out, cfg.model_type, seed, plan.dtype, profile)
    return SynthReport(str(out), k, len(specs), total, plan.dtype, cfg.model_type, profile)


def _write_notes(out: Path, model_type: str, seed: int, dtype: str, profile: str = "random") -> None:
    (out / "README.md").write_text(
        f"# Synthetic {model_type} checkpoint\n\nWritten by `dsv3-tools synth` (seed {seed}, {dtype}, "
        f"profile {profile}). Synthetic weights, not a trained model.\n"
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
