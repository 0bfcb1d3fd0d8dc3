"""Independent decoders of DeepSeek-V4's formats, written from the format facts (docs/format-v4.md section 3), not
from dsv3_tools: bit fields decoded by formula, in float64 (every value of these formats is exact there).

- e2m1 (OCP FP4): bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal (0.5 * m).
- e4m3fn: bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa; exponent 0 subnormal (m/8 * 2**-6);
  0x7F / 0xFF NaN.
- E8M0: 2**(e - 127), 255 NaN.
- Experts: byte j of a row holds column 2j in its low nibble, 2j + 1 in its high nibble; one scale per 32 columns.
"""

from __future__ import annotations

import math

import torch


def e2m1_value(nibble: int) -> float:
    sign = -1.0 if nibble & 0b1000 else 1.0
    exp, man = (nibble >> 1) & 0b11, nibble & 1
    mag = 0.5 * man if exp == 0 else 2.0 ** (exp - 1) * (1 + 0.5 * man)
    return math.copysign(mag, sign)


def e4m3_value(byte: int) -> float:
    if byte & 0x7F == 0x7F:
        return math.nan
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    mag = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return math.copysign(mag, sign)


def e8m0_value(e: int) -> float:
    return math.nan if e == 255 else math.ldexp(1.0, e - 127)


E2M1 = torch.tensor([e2m1_value(n) for n in range(16)], dtype=torch.float64)
E4M3 = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float64)
E8M0 = torch.tensor([e8m0_value(e) for e in range(256)], dtype=torch.float64)


def fp4_values(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 [out, in] of packed FP4 [out, in/2] and E8M0 group scales [out, in/32]."""
    b = packed.contiguous().view(torch.uint8).long()
    rows, half = b.shape
    codes = torch.empty(rows, half * 2, dtype=torch.long)
    codes[:, 0::2] = b & 0xF
    codes[:, 1::2] = b >> 4
    s = E8M0[scale.contiguous().view(torch.uint8).long()]
    cols = torch.arange(half * 2) // 32
    return E2M1[codes] * s[:, cols]


def fp8_values(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 [out, in] of an e4m3 weight with one scale (E8M0 bytes or F32) per 128x128 block, multiplied exactly
    (float64 holds every such product)."""
    q = E4M3[w.contiguous().view(torch.uint8).long()]
    s = E8M0[scale.view(torch.uint8).long()] if scale.dtype in (torch.uint8, torch.float8_e8m0fnu) else scale.double()
    rows = torch.arange(w.shape[0]) // 128
    cols = torch.arange(w.shape[1]) // 128
    return q * s[rows][:, cols]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from +0.0 and NaN equals the same NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def read_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, read by safetensors (not by dsv3_tools)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out


def copy_ckpt(src, dst):
    """A writable copy of a (read-only fixture) checkpoint folder."""
    import shutil

    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def rewrite(folder, edit) -> None:
    """Apply ``edit(files: file name -> {tensor name: tensor})`` to a copied HF checkpoint and fix its index."""
    import json

    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = {f: load_file(folder / f) for f in sorted(set(index["weight_map"].values()))}
    edit(files)
    wmap, total = {}, 0
    for f, ts in files.items():
        save_file(ts, folder / f, metadata={"format": "pt"})
        for k, v in ts.items():
            wmap[k] = f
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def holder(files: dict, name: str) -> dict:
    return next(ts for ts in files.values() if name in ts)
