"""Block-FP8 weight quantization (the reverse of ``weight_dequant``): torch reference.

Per ``block`` tile: ``s = max(amax(|x|), 1e-4) / 448`` (f32) or, for ue8m0, the smallest power of two with
``amax / s <= 448``; ``q = fp8_e4m3(x / s)``, round to nearest even, saturating at +-448. Partial edge tiles
use their real elements only (zero padding does not change amax).

With ``prev`` (the block scales the weight had before, e.g. kept by ``cast fp8-bf16``), a tile keeps its old scale
whenever quantizing with it gives back the tile's values exactly (``bf16(f32(q) * s_prev) == x``, bit for bit):
then ``q`` and ``s`` are the original bytes of an unchanged tile; a changed tile gets a fresh scale.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # the official kernels' floor for an all-zero block


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0, f32), computed exactly with frexp rather than log2."""
    m, e = torch.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(x), e)


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """amax(|x|) per block on the ceil grid, in f32."""
    M, N = x.shape
    b0, b1 = block
    gm, gn = -(-M // b0), -(-N // b1)
    xa = x.float().abs()
    if M % b0 or N % b1:
        xa = torch.nn.functional.pad(xa, (0, gn * b1 - N, 0, gm * b0 - M))
    return xa.view(gm, b0, gn, b1).amax(dim=(1, 3))


def scales_from_amax(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    # Divide by a tensor, not a Python scalar: on CUDA the scalar form multiplies by a rounded reciprocal.
    s = amax.clamp(min=AMAX_FLOOR) / torch.full_like(amax, FP8_MAX)
    if scale_fmt == "ue8m0":
        s = pow2_ceil(s)
    elif scale_fmt is not None:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}")
    return s


def expand_scales(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over its elements, cropped to ``shape``."""
    M, N = shape
    return s.repeat_interleave(block[0], 0)[:M].repeat_interleave(block[1], 1)[:, :N]


def quantize_with_scales(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``fp8_e4m3(x / s)`` per tile (RNE, saturating at +-448) for given F32 block scales ``s``."""
    return (x.float() / expand_scales(s, tuple(x.shape), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def reproduces(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per tile [ceil grid]: whether ``bf16(f32(q) * s)``, in ``x``'s dtype, equals ``x`` bit for bit."""
    back = (q.float() * expand_scales(s, tuple(x.shape), block)).to(torch.bfloat16).to(x.dtype)
    same = back.view(_BITS[x.dtype]) == x.view(_BITS[x.dtype])
    M, N = x.shape
    b0, b1 = block
    gm, gn = -(-M // b0), -(-N // b1)
    same = torch.nn.functional.pad(same, (0, gn * b1 - N, 0, gm * b0 - M), value=True)
    return same.view(gm, b0, gn, b1).all(dim=3).all(dim=1)


def weight_quant_ref(
    x: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    scale_fmt: str | None = None,
    prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (F8_E4M3 values, F32 scales of the ceil grid); with ``prev``, keep each tile's
    previous scale where it reproduces the tile exactly."""
    assert x.dim() == 2, x.shape
    s = scales_from_amax(block_amax(x, block), scale_fmt)
    q = quantize_with_scales(x, s, block)
    if prev is None:
        return q, s
    assert prev.shape == s.shape and prev.dtype == torch.float32, (prev.shape, s.shape, prev.dtype)
    q_prev = quantize_with_scales(x, prev, block)
    keep = reproduces(x, q_prev, prev, block) & torch.isfinite(prev) & (prev > 0)
    s = torch.where(keep, prev, s)
    q = torch.where(expand_scales(keep, tuple(x.shape), block), q_prev.view(torch.uint8), q.view(torch.uint8))
    return q.view(torch.float8_e4m3fn), s
