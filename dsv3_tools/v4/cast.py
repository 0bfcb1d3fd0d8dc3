"""``cast`` on DeepSeek-V4: the plans the cast stage runs (``cast.run_cast``: streaming, bounded memory, resume, a
complete output folder) for V4's two conversions.

- ``to-bf16`` (also reached as ``cast fp8-bf16``): every F8_E4M3 weight becomes ``bf16(f32(w) * s)`` per 128x128
  block (E8M0 scales decoded exactly; -Base's F32 scales as in V3) and every FP4 routed expert becomes the BF16 of
  ``e2m1 * 2**(e - 127)`` per 1x32 group (exact); scales are dropped; ``config.json`` loses ``quantization_config``
  and ``expert_dtype``.
- ``fp4-fp8``: the FP4 experts become F8_E4M3 with one E8M0 scale per 128x128 block by the official converter's rule
  (``kernels/fp4.py``), exactly or not at all; everything else is copied byte for byte; ``config.json`` says
  ``expert_dtype: fp8``. The rule is exact only where each block's group exponents span little enough
  (``kernels.fp4.inexact_blocks``), so every expert scale is read while planning, and a block that FP8 cannot hold is
  refused (the tensor and the block named) before anything is written.

Both read every scale while planning (about 1/16 of the FP4 experts' bytes) and refuse NaN scales, decoded values
beyond BF16's range and out-of-range hash routing ids (``v4/validate.py``), so that a cast never writes NaN or inf
weights. The V4 arithmetic runs on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3_tools.kernels.fp4 import BLOCK, dequant_fp4, fp4_overflows, fp4_to_fp8, inexact_blocks

from ..cast import FP4_FP8, TO_BF16, CastPlan, FilePlan, Op, finish_plan
from ..checkpoint import Checkpoint
from ..errors import ConfigError, DeviceError, InexactConversionError, ScaleValueError
from ..stfile import Entry, TensorInfo, planned_size
from . import names as V
from .validate import check_values, resolve_format

EXACT_SPREAD = 14  # a block whose group exponents span at most this is always exact in FP8 (kernels/fp4.py)


def plan_v4_cast(
    ck: Checkpoint, dst: str | Path, direction: str, *, device: str = "auto", workers: int | None = None, mtp: str
) -> CastPlan:
    """The plan of a V4 cast (``direction`` TO_BF16 or FP4_FP8) of the opened, validated folder ``ck`` into ``dst``."""
    if device not in ("auto", "cpu"):
        raise DeviceError(f"cast on DeepSeek-V4 runs on the CPU (--device cpu), not {device!r}")
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"--workers must be a positive number of threads, got {workers!r}")
    cfg, src = ck.config, ck.path
    fmt = resolve_format(cfg, ck.tensors)
    if direction == FP4_FP8 and fmt.experts != "fp4":
        raise ConfigError(f"{src}: the routed experts are {fmt.experts.upper()}, not FP4: nothing to convert")
    files, dropped = _plan_files(ck, direction, mtp)
    converted = sorted(op.info.name for f in files for op in f.ops if op.kind != "copy")
    raw = json.loads((src / "config.json").read_text())
    out_cfg = dict(raw)
    if direction == TO_BF16:
        out_cfg.pop("quantization_config", None)
        out_cfg.pop("expert_dtype", None)
    else:
        out_cfg["expert_dtype"] = "fp8"
    out_cfg["torch_dtype"] = "bfloat16"
    if mtp == "drop":
        out_cfg["num_nextn_predict_layers"] = 0
    extra = {
        "family": cfg.model_type,
        "converted": converted,
        "from": {"format": fmt.label, "quantization_config": raw.get("quantization_config")},
        "expert_dtype": raw.get("expert_dtype"),
    }
    job = {"stage": "cast", "direction": direction, "mtp": mtp}
    plan = finish_plan(
        ck, Path(dst), direction, files, dropped, job, extra, "cpu", workers, mtp, (128, 128), None, out_cfg
    )
    _check_values(ck, fp4_fp8=direction == FP4_FP8)  # after the destination's checks: this reads every scale
    return plan


def _check_values(ck: Checkpoint, *, fp4_fp8: bool) -> None:
    """Read every scale and hash routing table and refuse bad values; for fp4-fp8 also any expert block that FP8
    cannot hold exactly (the expert scales are read a second time: simpler than one pass, and 1/16 of the experts)."""
    for p in check_values(ck):
        raise ScaleValueError(p["message"], file=p["file"], tensor=p["tensor"])
    if fp4_fp8:
        for name, info in ck.tensors.items():
            if info.dtype == "I8" and V.parse(name).row.quant == "expert":
                _check_exact(ck, info, ck.read_info(ck.tensors[V.scale_name(name)]).view(torch.uint8))


def _check_exact(ck: Checkpoint, w: TensorInfo, e: torch.Tensor) -> None:
    """Refuse an FP4 expert with a 128x128 block that FP8 with one E8M0 scale cannot hold exactly."""
    rows, half = w.shape
    if rows % BLOCK or (half * 2) % BLOCK:
        raise ConfigError(f"tensor {w.name!r}: {rows}x{half * 2} is not made of whole 128x128 blocks")
    per = BLOCK // 32
    blocks = e.view(rows // BLOCK, BLOCK, -1, per).to(torch.int32)
    spread = blocks.amax(dim=(1, 3)) - blocks.amin(dim=(1, 3))
    for bi in sorted({int(i) for i in (spread > EXACT_SPREAD).nonzero()[:, 0]}):
        slab = ck.read_bytes(w, bi * BLOCK * half, (bi + 1) * BLOCK * half).view(torch.int8).view(BLOCK, half)
        bad = inexact_blocks(slab, e[bi * BLOCK : (bi + 1) * BLOCK])
        if bad:
            j = bad[0][1]
            raise InexactConversionError(
                f"block ({bi}, {j}) (rows {bi * BLOCK}-{bi * BLOCK + BLOCK - 1}, columns {j * BLOCK}-{j * BLOCK + BLOCK - 1}) "
                f"has FP4 group exponents spanning {int(spread[bi, j])} and values FP8 with one 128x128 scale cannot "
                "hold exactly; keep it FP4 or cast to-bf16",
                file=w.file,
                tensor=w.name,
            )


def _plan_files(ck: Checkpoint, direction: str, mtp: str) -> tuple[list[FilePlan], int]:
    """Output files (the input's names), their tensors in input byte order, and what each becomes."""
    plans: list[FilePlan] = []
    dropped = 0
    for rel in sorted(ck.files):
        entries: list[Entry] = []
        ops: list[Op] = []
        bytes_in = 0
        for info in sorted(ck.headers[rel].tensors.values(), key=lambda i: i.start):
            name = info.name
            if mtp == "drop" and V.is_mtp_name(name):
                dropped += 1
                continue
            scale = ck.tensors.get(V.scale_name(name)) if name.endswith(".weight") else None
            if V.is_scale(name) and ck.tensors[V.weight_of(name)].dtype in _CONVERTED[direction]:
                continue  # consumed with its weight
            if scale is not None and info.dtype in _CONVERTED[direction]:
                rows, cols = info.shape
                if info.dtype == "I8":
                    cols *= 2  # two FP4 values a byte
                if direction == TO_BF16:
                    entries.append((name, "BF16", (rows, cols)))
                    ops.append(Op("dequant" if info.dtype == "F8_E4M3" else "dequant_fp4", info, scale))
                else:
                    sname = V.scale_name(name)
                    entries += [(name, "F8_E4M3", (rows, cols)), (sname, "F8_E8M0", (rows // BLOCK, cols // BLOCK))]
                    ops.append(Op("fp4_fp8", info, scale, scale_out=sname))
                bytes_in += info.nbytes + scale.nbytes
                continue
            entries.append((name, info.dtype, info.shape))
            ops.append(Op("copy", info))
            bytes_in += info.nbytes
        if entries:
            plans.append(FilePlan(rel, entries, ops, bytes_in, planned_size(entries, {"format": "pt"})))
    return plans, dropped


# The input dtypes each direction converts (a weight with a scale): FP8 and FP4 to BF16; FP4 (I8) to FP8.
_CONVERTED = {TO_BF16: ("F8_E4M3", "I8"), FP4_FP8: ("I8",)}


def convert_fp4(op: Op, x: torch.Tensor, s: torch.Tensor, r0: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One chunk of an FP4 expert (rows ``r0`` ..): BF16 (dequant_fp4), or (FP8, E8M0 block scales) (fp4_fp8).
    Runs on the cast's worker threads; planning refused every input this would have to round."""
    e = s.view(torch.uint8)
    if op.kind == "dequant_fp4":
        if fp4_overflows(x, e):
            raise ScaleValueError("decoded values overflow BF16", file=op.info.file, tensor=op.info.name)
        return dequant_fp4(x, e)
    bad = inexact_blocks(x, e)
    if bad:  # (planning read every scale and refused these: a file changed under us)
        i, j = bad[0]
        raise InexactConversionError(
            f"block ({r0 // BLOCK + i}, {j}) is not exact in FP8", file=op.info.file, tensor=op.info.name
        )
    return fp4_to_fp8(x, e)
