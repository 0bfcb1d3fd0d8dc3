"""DeepSeek-V4's scaled formats on the CPU: E8M0 scales, FP4 (e2m1) experts, and FP4 -> FP8 re-encoding.

The formats (docs/format-v4.md section 3):

- **E8M0** (safetensors ``F8_E8M0``, torch ``float8_e8m0fnu``): one unsigned byte ``e``, value ``2**(e - 127)``;
  ``e = 255`` is NaN. No sign, no zero, no mantissa.
- **FP4 e2m1** (OCP): a nibble, bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa: magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6 (nibble 8 is -0). Routed experts store two per byte along the input dim: byte ``j`` of
  a row holds column ``2j`` in its low nibble and ``2j + 1`` in its high nibble (I8 ``[out, in/2]``), with one E8M0
  scale per 1x32 group along the input dim (``[out, in/32]``): ``W[o, i] = e2m1(nibble(o, i)) * 2**(S[o, i // 32] - 127)``.
- **FP8 e4m3** with one E8M0 (or, on -Base checkpoints, F32) scale per 128x128 block: the dense weights.

Every function has a plain-torch ``*_ref`` (the test oracle) and, where speed matters, a fast CPU version that gives
the same bytes:

- ``dequant_fp4``: FP4 + E8M0 -> BF16. Always exact (two significant bits times a power of two) unless the product
  leaves BF16's range, which is reported. The fast path builds the BF16 bits directly: a byte -> two BF16 values
  table, then the scale added to the exponent field.
- ``fp4_to_fp8``: FP4 + 1x32 E8M0 -> FP8 e4m3 + 128x128 E8M0, by the rule of the official converter: per 128x128
  block the new scale is the largest of its 512 group scales divided by 2**6 (``6 * 2**6 = 384 <= 448``), and each
  value becomes ``e2m1 * 2**(e_g - e_max + 6)``. That is exact exactly when every value is a multiple of e4m3's
  smallest subnormal ``2**-9``: with ``k = e_g - e_new``, ``c * 2**k`` for ``|c|`` in {0.5, 1.5} needs ``k >= -8``
  (``e_max - e_g <= 14``), for {1, 3} ``k >= -9``, for {2, 6} ``k >= -10``, for 4 ``k >= -11``. ``inexact_blocks``
  finds the blocks where some value breaks that; callers refuse them rather than round.
- ``quant_fp4_ref``: BF16/F32 -> FP4 + E8M0 with the official activation rule (``s = 2**ceil(log2(amax / 6))`` per
  group, amax floored at ``6 * 2**-126``; round to nearest, ties to even): what ``synth`` stores.
"""

from __future__ import annotations

import torch

GROUP = 32  # FP4 values per E8M0 scale, along the input dim
BLOCK = 128  # FP8 block (rows and columns)
MAX_SHIFT = 6  # e4m3 holds 6 * 2**6 = 384 (<= 448), not 6 * 2**7
E8M0_NAN = 255

# e2m1 value of each nibble (index = nibble): OCP FP4, as listed in docs/format-v4.md 3.4. Nibble 8 is -0.0 here; the
# official converter's table writes +0.0 for it (the values are equal; the sign of zero is kept here).
E2M1 = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32
)


# ---------------------------------------------------------------------- E8M0
def e8m0_to_f32(e: torch.Tensor) -> torch.Tensor:
    """F32 of E8M0 bytes (uint8 or float8_e8m0fnu): ``2**(e - 127)``, exact (2**-127 is an F32 subnormal); 255 -> NaN."""
    e = e.view(torch.uint8).to(torch.int32)
    bits = e << 23  # the F32 exponent field: 2**(e - 127) for e >= 1
    bits = torch.where(e == 0, torch.full_like(bits, 0x00400000), bits)  # 2**-127: F32 subnormal, mantissa 0.5
    bits = torch.where(e == E8M0_NAN, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


def f32_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8) of F32 powers of two in [2**-127, 2**127]; ``ValueError`` for any other value."""
    m, ex = torch.frexp(s.float())  # s = m * 2**ex, m in [0.5, 1)
    e = ex.to(torch.int32) - 1 + 127
    if not bool(((m == 0.5) & (e >= 0) & (e <= 254)).all()):
        raise ValueError("not a power of two within E8M0's range [2**-127, 2**127]")
    return e.to(torch.uint8)


# ---------------------------------------------------------------------- FP4 -> BF16
def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """The nibbles (int64, 0..15) of packed FP4 bytes ``[..., n]`` as ``[..., 2n]``: low nibble first."""
    b = packed.view(torch.uint8).to(torch.int64)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def dequant_fp4_ref(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """BF16 ``[out, in]`` of packed FP4 ``[out, in/2]`` (I8/U8) with E8M0 group scales ``[out, in/32]`` (plain torch:
    F32 product, one rounding to BF16, which is exact unless the product overflows)."""
    assert packed.dim() == 2 and scale.shape == (packed.shape[0], packed.shape[1] * 2 // GROUP), (
        packed.shape,
        scale.shape,
    )
    v = E2M1[unpack_fp4(packed)]
    return (v * e8m0_to_f32(scale).repeat_interleave(GROUP, dim=1)).to(torch.bfloat16)


def _bf16_pair_table() -> torch.Tensor:
    """For each (scale byte, packed byte): the BF16 bits of the byte's two values times the scale, low nibble's in
    the low half of an int32: the reference's own result for every input it can see (NaN scales included)."""
    b = torch.arange(256, dtype=torch.uint8)
    packed = b.repeat(256, 1).view(torch.int8)  # row e: bytes 0..255 (16 groups of 16 bytes), all with scale e
    scale = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    return dequant_fp4_ref(packed, scale).view(torch.int32).reshape(-1)  # [e * 256 + byte]


_PAIRS: torch.Tensor | None = None


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant_fp4_ref``, fast: each byte's two BF16 values looked up in a (scale byte, byte) table built by the
    reference itself, so that the bytes are the same for every input."""
    global _PAIRS
    if _PAIRS is None:
        _PAIRS = _bf16_pair_table()
    rows, half = packed.shape
    groups = half * 2 // GROUP
    assert scale.shape == (rows, groups), (packed.shape, scale.shape)
    out = torch.empty((rows, half * 2), dtype=torch.bfloat16) if out is None else out
    pairs = out.view(torch.int32).view(rows, half)
    e = scale.view(torch.uint8)
    step = max(1, (1 << 20) // max(half, 1))  # rows per step: the int32 index stays in cache
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        idx = packed[r0:r1].view(torch.uint8).to(torch.int32).view(r1 - r0, groups, GROUP // 2)
        idx += e[r0:r1].to(torch.int32).unsqueeze(-1) << 8
        torch.index_select(_PAIRS, 0, idx.view(-1), out=pairs[r0:r1].reshape(-1))
    return out


# The largest scale byte at which every e2m1 value times the scale is finite in BF16 (6 * 2**125 = 1.5 * 2**127).
FINITE_FP4_SCALE = 252


def fp4_overflows(packed: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether some value's product leaves BF16's (and F32's) finite range, or a scale is NaN."""
    e = scale.view(torch.uint8)
    if not bool((e > FINITE_FP4_SCALE).any()):
        return False
    return not bool(torch.isfinite(dequant_fp4_ref(packed, scale)).all())


# ---------------------------------------------------------------------- FP4 -> FP8
# 2-adic valuation of 2|c| per magnitude code (0 for 0.5 and 1.5, 1 for 1 and 3, 2 for 2 and 6, 3 for 4); zero fits
# at any shift. ``c * 2**k`` is a multiple of 2**-9 iff 2|c| * 2**(k + 8) is an integer: iff k + 8 + v >= 0.
_V2 = torch.tensor([99, 0, 1, 0, 2, 1, 3, 2], dtype=torch.int32)


def _block_scales(e: torch.Tensor) -> torch.Tensor:
    """The new 128x128 block scale bytes: the largest group scale byte of each block, minus 6 (floored at 0)."""
    rows, groups = e.shape
    per = BLOCK // GROUP
    emax = e.view(rows // BLOCK, BLOCK, groups // per, per).to(torch.int32).amax(dim=(1, 3))
    return (emax - MAX_SHIFT).clamp(min=0)


def _shifts(e: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """k = e_g - e_new per group ``[out, in/32]`` (int32)."""
    per = BLOCK // GROUP
    return e.to(torch.int32) - new.repeat_interleave(BLOCK, 0).repeat_interleave(per, 1)


def inexact_blocks(packed: torch.Tensor, scale: torch.Tensor) -> list[tuple[int, int]]:
    """The 128x128 blocks (block row, block column) that ``fp4_to_fp8`` cannot encode exactly."""
    e = scale.view(torch.uint8)
    k = _shifts(e, _block_scales(e))
    low = k < -8  # only these groups can hold a value that is not a multiple of 2**-9
    if not bool(low.any()):
        return []
    rows = packed.shape[0]
    codes = unpack_fp4(packed).view(rows, -1, GROUP) & 0x7
    bad = (_V2[codes] + (k + 8).unsqueeze(-1) < 0).any(dim=-1) & low  # per group
    per = BLOCK // GROUP
    blocks = bad.view(rows // BLOCK, BLOCK, -1, per).any(dim=(1, 3)).nonzero()
    return [(int(i), int(j)) for i, j in blocks]


def fp4_to_fp8_ref(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 ``[out, in]``, E8M0 uint8 ``[out/128, in/128]``) by the official converter's rule, in plain torch:
    ``e2m1 * 2**(e_g - e_new)`` computed in F32 and cast to e4m3 (round to nearest even where it is not exact)."""
    rows, half = packed.shape
    cols = half * 2
    assert rows % BLOCK == 0 and cols % BLOCK == 0 and scale.shape == (rows, cols // GROUP), (packed.shape, scale.shape)
    e = scale.view(torch.uint8)
    new = _block_scales(e)
    k = _shifts(e, new).to(torch.float32)
    v = E2M1[unpack_fp4(packed)] * torch.exp2(k).repeat_interleave(GROUP, dim=1)
    return v.to(torch.float8_e4m3fn), new.to(torch.uint8)


def _fp8_table() -> torch.Tensor:
    """For each (shift k + 11, byte): the two e4m3 bytes of the byte's e2m1 values times 2**k, low nibble's first
    (an int16), for k = -11 .. 6 (the shifts at which some nonzero e2m1 value is still exact)."""
    ks = torch.arange(-11, MAX_SHIFT + 1, dtype=torch.float32)
    vals = (E2M1.unsqueeze(0) * torch.exp2(ks).unsqueeze(1)).to(torch.float8_e4m3fn).view(torch.uint8)
    b = torch.arange(256)
    return torch.stack([vals[:, b & 0x0F], vals[:, b >> 4]], dim=-1).view(torch.int16).reshape(-1)


_FP8_PAIRS = _fp8_table()


def fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp4_to_fp8_ref``, fast (a (shift, byte) -> two e4m3 bytes table), for inputs ``inexact_blocks`` accepts;
    blocks it does not accept go through the reference (callers refuse them first)."""
    rows, half = packed.shape
    assert rows % BLOCK == 0 and (half * 2) % BLOCK == 0 and scale.shape == (rows, half * 2 // GROUP), (
        packed.shape,
        scale.shape,
    )
    e = scale.view(torch.uint8)
    new = _block_scales(e)
    k = _shifts(e, new)
    if bool((k < -11).any()):
        q, s = fp4_to_fp8_ref(packed, scale)
        return q, s
    groups = half * 2 // GROUP
    idx = packed.view(torch.uint8).to(torch.int32).view(rows, groups, GROUP // 2)
    idx += ((k + 11) << 8).unsqueeze(-1)
    q = torch.index_select(_FP8_PAIRS, 0, idx.view(-1)).view(torch.uint8).view(rows, half * 2)
    return q.view(torch.float8_e4m3fn), new.to(torch.uint8)


# ---------------------------------------------------------------------- BF16 -> FP4
# Round to nearest e2m1 magnitude, ties to the even code: the midpoints between neighbours, and which way a tie goes
# (up: the upper neighbour's code is even).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)


def quant_fp4_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed FP4 as int8 ``[out, in/2]``, E8M0 uint8 ``[out, in/32]``) of a 2-D ``x`` by the official FP4 rule:
    per 1x32 group ``s = 2**ceil(log2(max(amax, 6 * 2**-126) / 6))``, then ``x / s`` rounded to nearest e2m1."""
    rows, cols = x.shape
    assert cols % GROUP == 0, x.shape
    xf = x.float().reshape(rows, cols // GROUP, GROUP)
    amax = xf.abs().amax(dim=-1).clamp(min=6 * 2.0**-126)
    m, ex = torch.frexp(amax / 6)  # amax / 6 = m * 2**ex, m in [0.5, 1): ceil(log2) is ex, or ex - 1 when m == 0.5
    ex = torch.where(m == 0.5, ex - 1, ex)
    y = (xf / torch.ldexp(torch.ones_like(amax), ex).unsqueeze(-1)).clamp(-6, 6)
    a = y.abs()
    code = torch.zeros_like(a, dtype=torch.int64)
    for mid, up in zip(_MIDPOINTS, _TIE_UP):
        code += (a >= mid) if up else (a > mid)
    code = (code | (torch.signbit(y).to(torch.int64) << 3)).view(rows, cols)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, (ex + 127).to(torch.uint8)
