"""Fast CPU block-FP8 dequantization and quantization, bit-identical to the plain-torch references.

``dequant_fp8`` computes ``bf16(f32(W[i, j]) * S[i // B0, j // B1])`` exactly like ``weight_dequant_ref``, about
15x faster on CPU. torch's eager fp8 -> f32 conversion is a scalar loop; integer shifts and masks vectorize. For an
E4M3 byte ``b`` (sign bit, 4 exponent bits, 3 mantissa bits), the f32 whose bits are
``(sign << 31) | ((b & 0x7F) << 20)`` equals ``f32(fp8(b)) * 2**-120`` for normal and subnormal ``b`` alike: both
formats give exponent field 0 the same "no hidden bit" meaning, and the bias differs by 127 - 7 = 120. Since
``s * 2**120`` is exact (a power-of-two step, checked to stay finite), ``x * (s * 2**120)`` is the same real number as
``f32(w) * s`` and rounds to the same f32: one rounding there, one more (RNE) to bf16, as in the reference.
The trick has no NaN (E4M3 byte 0x7F / 0xFF): chunks holding one, or scales >= 2**7, go to the reference.

``quant_fp8`` is ``weight_quant_ref`` computed block-row by block-row (same ops, same bits), so memory stays at one
block row of f32 whatever the weight size.
"""

from __future__ import annotations

import torch

from .weight_dequant import weight_dequant_ref
from .weight_quant import weight_quant_ref

_MASK = 0x87F00000 - (1 << 32)  # keep the sign bit (31) and the 7 shifted E4M3 bits (26..20), as an int32
_LOW7 = 0x7F7F7F7F7F7F7F7F
_ONES = 0x0101010101010101
_HIGH = 0x8080808080808080 - (1 << 64)
_SUB_ELEMS = 1 << 20  # elements per inner step: the int32 scratch (4 MB) stays in cache


def has_fp8_nan(raw: torch.Tensor) -> bool:
    """Whether a flat uint8 tensor of E4M3 bytes holds a NaN (low 7 bits all ones), eight bytes per int64 op."""
    n8 = raw.numel() // 8 * 8
    if n8 and raw.storage_offset() % 8 == 0:
        # Per byte, (b & 0x7F) + 1 reaches 0x80 exactly when the low 7 bits are all ones; it never carries into
        # the next byte, so one int64 add tests eight bytes.
        v = raw[:n8].view(torch.int64) & _LOW7
        v += _ONES
        v &= _HIGH
        if bool(v.any()):
            return True
    else:
        n8 = 0
    tail = raw[n8:]
    return bool(((tail & 0x7F) == 0x7F).any()) if tail.numel() else False


def _trick_is_exact() -> bool:
    """Self-check on all 256 byte values (guards against a flush-denormals mode that breaks the subnormals)."""
    b = torch.arange(256, dtype=torch.uint8).view(1, 256)
    b = b[:, (b[0] & 0x7F) != 0x7F]
    s = torch.tensor([[0.37]], dtype=torch.float32)
    got = _dequant_trick(b.view(torch.int8), s, (128, 512))
    want = weight_dequant_ref(b.view(torch.float8_e4m3fn), s, (128, 512))
    return torch.equal(got.view(torch.int16), want.view(torch.int16))


def _dequant_trick(x8: torch.Tensor, s: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None):
    rows, n = x8.shape
    b0, b1 = block
    out = torch.empty((rows, n), dtype=torch.bfloat16) if out is None else out
    srow = (s * 2.0**120).repeat_interleave(b0, 0)[:rows]  # per-row scales, [rows, ceil(n / b1)]
    nfull = n // b1
    step = max(1, _SUB_ELEMS // max(n, 1))
    scratch = torch.empty((min(step, rows), n), dtype=torch.int32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        b = scratch[: r1 - r0]
        b.copy_(x8[r0:r1])  # int8 -> int32 sign-extends: bit 31 is the sign
        b.bitwise_left_shift_(20).bitwise_and_(_MASK)
        f = b.view(torch.float32)
        if nfull:
            f[:, : nfull * b1].view(r1 - r0, nfull, b1).mul_(srow[r0:r1, :nfull].unsqueeze(-1))
        if n % b1:
            f[:, nfull * b1 :].mul_(srow[r0:r1, nfull : nfull + 1])
        out[r0:r1].copy_(f)
    return out


_EXACT: bool | None = None


def dequant_fp8(
    w: torch.Tensor, s: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """BF16 of a 2-D E4M3 weight (or its raw uint8 bytes) times its F32 block scales; bit-identical to the reference.

    ``w`` may be a row slice of a larger weight whose first row starts a block; ``s`` is then the matching rows of
    the scale grid (``ceil(rows / B0)`` x ``ceil(cols / B1)``). Writes into ``out`` (BF16, same shape) when given.
    """
    global _EXACT
    assert w.dim() == 2 and s.dim() == 2 and s.dtype == torch.float32, (w.shape, w.dtype, s.shape, s.dtype)
    rows, n = w.shape
    assert s.shape == (-(-rows // block[0]), -(-n // block[1])), (w.shape, s.shape, block)
    raw = w.contiguous().view(torch.uint8)
    if _EXACT is None:
        _EXACT = _trick_is_exact()
    if not _EXACT or has_fp8_nan(raw.reshape(-1)) or not bool((s.abs() < 2.0**7).all()):
        ref = weight_dequant_ref(raw.view(torch.float8_e4m3fn), s, block)
        if out is None:
            return ref
        out.copy_(ref)
        return out
    return _dequant_trick(raw.view(torch.int8), s, block, out)


def quant_fp8(
    x: torch.Tensor, block: tuple[int, int], scale_fmt: str | None = None, prev: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_quant_ref`` one block row at a time: the same (F8_E4M3, F32 scales), bounded memory. ``prev``: the
    previous scales of these rows' blocks (kept where they reproduce a tile exactly)."""
    rows = x.shape[0]
    b0 = block[0]
    step = max(b0, (_SUB_ELEMS * 4 // max(x.shape[1], 1)) // b0 * b0)
    qs, ss = [], []
    for r0 in range(0, rows, step):
        p = prev[r0 // b0 : -(-min(rows, r0 + step) // b0)] if prev is not None else None
        q, sc = weight_quant_ref(x[r0 : r0 + step], block, scale_fmt, p)
        qs.append(q)
        ss.append(sc)
    if len(qs) == 1:
        return qs[0], ss[0]
    return torch.cat(qs), torch.cat(ss)
