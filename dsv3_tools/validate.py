"""Validation of an opened checkpoint against its config: scales, then the tensor set (names, shapes, dtypes).

Each check reports through ``problem(error)``: ``open_checkpoint(strict=True)`` raises the first, the lenient mode
(``inspect``, ``verify``) collects them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import names as N
from .errors import (
    CheckpointError,
    MissingScaleError,
    MissingTensorError,
    OrphanScaleError,
    ScaleShapeError,
    TensorSpecError,
    UnexpectedTensorError,
    UnknownNameError,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

Problem = Callable[[CheckpointError], None]


def validate_scales(ck: Checkpoint, problem: Problem) -> None:
    """Every FP8 weight has an F32 scale of the ceil-grid shape; no scale without its weight."""
    block = ck.config.block_size if ck.config else (128, 128)
    for name, info in ck.tensors.items():
        if N.is_scale(name):
            w = N.weight_of(name)
            if w not in ck.tensors:
                problem(OrphanScaleError("scale without its weight", file=info.file, tensor=name))
            continue
        if info.dtype == "F8_E4M3":
            s = ck.tensors.get(N.scale_name(name))
            if s is None:
                problem(MissingScaleError("FP8 weight without its weight_scale_inv", file=info.file, tensor=name))
                continue
            shape = ck.full_shape(name)
            grid = tuple(-(-d // b) for d, b in zip(shape, block)) if len(shape) == 2 else None
            sshape = ck.full_shape(N.scale_name(name))  # keyed by HF name (s.name is the MP name in that layout)
            if s.dtype != "F32" or grid is None or sshape != grid:
                problem(
                    ScaleShapeError(
                        f"scale is {s.dtype}{list(sshape)}, expected F32{list(grid) if grid else '?'} for weight "
                        f"{list(shape)} with {block[0]}x{block[1]} blocks",
                        file=s.file,
                        tensor=s.name,
                    )
                )


def validate(ck: Checkpoint, problem: Problem) -> None:
    """Scales, then the tensor set against the config: names, shapes, dtypes."""
    validate_scales(ck, problem)
    cfg = ck.config
    assert cfg is not None
    has_mtp_tensors = any(N.is_mtp_name(cfg, n) for n in ck.tensors)
    expected = N.expected_tensors(cfg, mtp=has_mtp_tensors or ck.layout != "mp")
    fp8_in_files = any(i.dtype == "F8_E4M3" for i in ck.tensors.values())
    if cfg.is_fp8 and not fp8_in_files and ck.tensors:
        problem(
            TensorSpecError("config.json declares quantization_config (FP8) but no tensor is FP8", file="config.json")
        )
        return
    if not cfg.is_fp8 and fp8_in_files:
        problem(TensorSpecError("FP8 tensors present but config.json has no quantization_config", file="config.json"))
        return
    for name, info in ck.tensors.items():
        spec = expected.get(name)
        w_spec = expected.get(N.weight_of(name))
        if spec is None and N.is_scale(name) and w_spec is not None and "F8_E4M3" in w_spec.alt_dtypes:
            continue  # the scale of an accepted FP8 alternative (eh_proj): checked by validate_scales
        if spec is None:
            try:
                N.parse_hf(name)
                problem(UnexpectedTensorError("not expected for this config", file=info.file, tensor=name))
            except UnknownNameError as e:
                e.file = info.file
                problem(e)
            continue
        if N.is_scale(name):
            continue  # checked by validate_scales
        shape = ck.full_shape(name)
        if ck.layout == "mp":
            n = N.parse_hf(name)
            want = len(ck.mp_parts[name])
            if n.split == N.EXPERT or isinstance(n.split, int) or n.split is None:
                exp_parts = 1 if n.split == N.EXPERT else ck.world
                if want != exp_parts:
                    problem(
                        TensorSpecError(
                            f"found in {want} rank files, expected {exp_parts}", file=info.file, tensor=name
                        )
                    )
        if shape != spec.shape or (info.dtype != spec.dtype and info.dtype not in spec.alt_dtypes):
            problem(
                TensorSpecError(
                    f"is {info.dtype}{list(shape)}, expected {spec.dtype}{list(spec.shape)}",
                    file=info.file,
                    tensor=name,
                )
            )
    for name, spec in expected.items():
        if name in ck.tensors:
            continue
        if N.is_scale(spec.name):
            w = N.weight_of(spec.name)
            if w in ck.tensors and ck.tensors[w].dtype != "F8_E4M3":
                continue  # an accepted non-FP8 alternative carries no scale
            if w in ck.tensors:
                continue  # reported by validate_scales
        problem(MissingTensorError("expected by the config but absent", tensor=name))
