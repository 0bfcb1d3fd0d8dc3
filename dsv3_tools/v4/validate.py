"""The checks of an opened DeepSeek-V4 checkpoint: its tensor set against the config (names, shapes, dtypes, every
scale with its grid), in the Hugging Face layout and in the official model-parallel one; and, reading the scales,
their values (E8M0 never NaN, decoded weights finite, F32 scales positive) and the hash routing table's expert ids.

What the config leaves open is read from the checkpoint (docs/format-v4.md 3.5, 4.4): the experts' format (I8:
FP4, F8_E4M3: FP8) when ``expert_dtype`` is absent, and the dtype of the FP8 weights' scales (F8_E8M0 in the
release, F32 in -Base). Problems go through ``problem(error)`` like the V3 checks (``validate.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import (
    CheckpointError,
    MissingScaleError,
    MissingTensorError,
    OrphanScaleError,
    ScaleShapeError,
    TensorSpecError,
    UnexpectedTensorError,
    UnknownNameError,
)
from ..layout import MP_RE
from . import names as V
from .config import V4Config

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..stfile import TensorInfo

Problem = Callable[[CheckpointError], None]
QUANTIZED = ("F8_E4M3", "I8", "F4")
# e4m3's largest value (448 = 1.75 * 2**8) times 2**(e - 127) stays finite in BF16 for E8M0 bytes up to this one.
FINITE_FP8_SCALE = 246


def resolve_format(cfg: V4Config, tensors: dict[str, TensorInfo]) -> V.Format:
    """How the checkpoint stores its weights: from the config where it says, else from the tensors themselves."""
    if not cfg.is_fp8:
        return V.Format("bf16", "bf16")
    experts = cfg.expert_dtype
    if experts is None:
        first = next((i for n, i in tensors.items() if ".experts." in n and n.endswith(".weight")), None)
        experts = {"F8_E4M3": "fp8", "BF16": "bf16"}.get(first.dtype, "fp4") if first is not None else "fp4"
    scale = "F8_E8M0"
    for name, info in tensors.items():
        if V.is_scale(name) and info.dtype in ("F8_E8M0", "F32"):
            w = tensors.get(V.weight_of(name))
            if w is not None and w.dtype == "F8_E4M3":
                scale = info.dtype
                break
    return V.Format("fp8", experts, scale)


def validate(ck: Checkpoint, problem: Problem) -> None:
    """The tensor set of a V4 checkpoint against its config, in either layout."""
    cfg = ck.config
    quantized = any(i.dtype in QUANTIZED for i in ck.tensors.values())
    if cfg.is_fp8 and not quantized and ck.tensors:
        problem(
            TensorSpecError("config.json declares quantization_config but no tensor is FP8/FP4", file="config.json")
        )
        return
    if not cfg.is_fp8 and quantized:
        problem(
            TensorSpecError("FP8/FP4 tensors present but config.json has no quantization_config", file="config.json")
        )
        return
    fmt = resolve_format(cfg, ck.tensors)
    mtp = ck.layout != "mp" or any(V.is_mtp_name(n) for n in ck.tensors)
    if ck.layout == "mp":
        for rel, h in ck.headers.items():
            m = MP_RE.match(rel)
            if m is not None:
                _check_set(h.tensors, V.expected_mp_tensors(cfg, fmt, int(m.group(1)), ck.world, mtp=mtp), problem)
    else:
        _check_set(ck.tensors, V.expected_tensors(cfg, fmt, mtp=mtp), problem)


def validate_scales(ck: Checkpoint, problem: Problem) -> None:
    """Without a config: every FP8/FP4 weight has its ``.scale`` of the right grid, no scale without its weight."""
    for name, info in ck.tensors.items():
        if V.is_scale(name):
            if V.weight_of(name) not in ck.tensors:
                problem(OrphanScaleError("scale without its weight", file=info.file, tensor=name))
            continue
        if info.dtype not in QUANTIZED:
            continue
        s = ck.tensors.get(V.scale_name(name))
        if s is None:
            problem(MissingScaleError(f"{info.dtype} weight without its .scale", file=info.file, tensor=name))
            continue
        rows, cols = ck.full_shape(name)
        cols = cols * 2 if info.dtype == "I8" else cols
        grid = V.grid((rows, cols)) if info.dtype == "F8_E4M3" else (rows, cols // V.FP4_GROUP)
        if ck.full_shape(s.name) != grid:
            problem(ScaleShapeError(f"scale is {list(s.shape)}, expected {list(grid)}", file=s.file, tensor=s.name))


MARKER = "hc_head_fn"  # a tensor only DeepSeek-V4 has, in every layout (replicated in each rank file)


def looks_v4(names: set[str] | dict) -> bool:
    """Whether a folder opened without a config holds a DeepSeek-V4 checkpoint (its names: V4's own, in any layout)."""
    return MARKER in names


def _check_set(tensors: dict[str, TensorInfo], expected: dict[str, V.Spec], problem: Problem) -> None:
    """One file set (a HF folder, or one rank file) against its expected tensors."""
    for name, info in tensors.items():
        spec = expected.get(name)
        if spec is None:
            try:
                n = V.parse(name)
            except UnknownNameError as e:
                e.file = info.file
                problem(e)
                continue
            if n.scale and n.weight not in tensors:
                problem(OrphanScaleError("scale without its weight", file=info.file, tensor=name))
            elif n.scale:
                w = tensors[n.weight]
                problem(
                    ScaleShapeError(f"a scale on a {w.dtype} weight (not quantized here)", file=info.file, tensor=name)
                )
            else:
                problem(UnexpectedTensorError("not expected for this config", file=info.file, tensor=name))
            continue
        if info.shape != spec.shape or info.dtype != spec.dtype:
            err = ScaleShapeError if V.is_scale(name) else TensorSpecError
            what = f"is {info.dtype}{list(info.shape)}, expected {spec.dtype}{list(spec.shape)}"
            problem(err(what, file=info.file, tensor=name))
    for name in expected:
        if name in tensors:
            continue
        if V.is_scale(name) and V.weight_of(name) in tensors:
            w = tensors[V.weight_of(name)]
            problem(MissingScaleError(f"{w.dtype} weight without its .scale", file=w.file, tensor=w.name))
        elif not V.is_scale(name):
            problem(MissingTensorError("expected by the config but absent", tensor=name))


# ---------------------------------------------------------------------- values
def check_values(ck: Checkpoint, ranks: set[int] | None = None) -> list[dict]:
    """Problems in the values of every scale (and each rank file's piece of it; ``ranks``: only those ranks') and of
    the hash routing tables: NaN E8M0 bytes, decoded weights beyond BF16's range, F32 scales not positive and
    finite, ``tid2eid`` ids outside the experts. Reads the scales (about 1/16 of the FP4 experts' bytes)."""
    cfg = ck.config
    out: list[dict] = []
    if not any(V.is_scale(n) or n.endswith(".gate.tid2eid") for n in ck.tensors):
        return out

    def problem(kind: str, message: str, info: TensorInfo) -> None:
        out.append({"kind": kind, "file": info.file, "tensor": info.name, "message": message})

    for name in ck.tensors:
        infos = [p.info for p in ck.mp_parts.get(name, []) if ranks is None or p.rank in ranks] or (
            [ck.tensors[name]] if ck.layout != "mp" else []
        )
        for info in infos:
            if name.endswith(".gate.tid2eid"):
                ids = ck.read_info(info)
                bad = (ids < 0) | (ids >= cfg.n_routed_experts)
                if bool(bad.any()):
                    tok = int(bad.nonzero()[0][0])
                    problem("value", f"token {tok} routes to expert {int(ids[tok].max())} (outside 0..E-1)", info)
                continue
            if not V.is_scale(name):
                continue
            weight = _piece(ck, V.weight_of(name), info)
            msg = _scale_problem(ck, info, weight)
            if msg:
                problem("scale_value", msg, info)
    return out


def _piece(ck: Checkpoint, name: str, scale: TensorInfo) -> TensorInfo | None:
    """The weight stored beside a scale (the same rank file's piece in the MP layout)."""
    if ck.layout != "mp":
        return ck.tensors.get(name)
    return next((p.info for p in ck.mp_parts.get(name, []) if p.info.file == scale.file), None)


def _scale_problem(ck: Checkpoint, info: TensorInfo, weight: TensorInfo | None) -> str | None:
    """What is wrong with the values of one scale tensor, or None."""
    import torch

    from dsv3_tools.kernels.fp4 import FINITE_FP4_SCALE, e8m0_to_f32, fp4_overflows

    s = ck.read_info(info)
    if info.dtype == "F32":
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            idx = [int(i) for i in bad.nonzero()[0]]
            return f"scale block {idx} is {float(s[tuple(idx)])}"
        return None
    if info.dtype != "F8_E8M0":
        return None
    e = s.view(torch.uint8)
    if bool((e == 255).any()):
        return f"E8M0 scale {[int(i) for i in (e == 255).nonzero()[0]]} is NaN (byte 255)"
    if weight is None:
        return None
    fp4 = weight.dtype in ("I8", "F4")
    if int(e.max()) <= (FINITE_FP4_SCALE if fp4 else FINITE_FP8_SCALE):
        return None  # every value of the format times these scales is finite: no need to read the weight
    w = ck.read_info(weight)
    if fp4:
        finite = not fp4_overflows(w.view(torch.int8).reshape(w.shape[0], -1), e)
    else:
        big = e8m0_to_f32(e).repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        finite = bool(torch.isfinite((w.float() * big).to(torch.bfloat16)).all())
    return None if finite else f"scales up to 2**{int(e.max()) - 127} make decoded weights overflow BF16"


# ---------------------------------------------------------------------- what inspect says
def describe(cfg: V4Config, fmt: V.Format) -> dict:
    """Family, variant, quantization and layer kinds of a V4 checkpoint, for ``inspect``."""
    geometry = {(4096, 256): "DeepSeek-V4-Flash", (7168, 384): "DeepSeek-V4-Pro"}
    family = geometry.get((cfg.hidden_size, cfg.n_routed_experts), "DeepSeek-V4")
    if fmt.dense == "bf16":
        variant, quant = "BF16 (no quantization)", "none (bf16)"
    else:
        scales = "E8M0" if fmt.scale == "F8_E8M0" else "F32"
        dense = f"fp8 e4m3 128x128 ({scales} scales)"
        if fmt.experts == "fp4":
            variant, quant = "instruct release: FP4 experts", f"{dense}; experts fp4 e2m1 1x32 (E8M0 scales)"
        elif fmt.experts == "fp8":
            base = fmt.scale == "F32"
            variant = "-Base release: FP8 experts, F32 scales" if base else "FP8 experts, E8M0 scales (cast fp4-fp8)"
            quant = f"{dense}, experts included"
        else:
            variant, quant = "FP8 dense, BF16 experts", f"{dense}; experts bf16"
    kinds: dict[str, int] = {}
    for layer in cfg.main_layers:
        r = cfg.ratio(layer)
        k = "sliding window" if r == 0 else f"compressed 1/{r}" + (" + indexer" if r == 4 else "")
        kinds[k] = kinds.get(k, 0) + 1
    kinds["hash-routed"] = cfg.num_hash_layers
    return {"family": family, "variant": variant, "quantization": quant, "layer_kinds": kinds}
