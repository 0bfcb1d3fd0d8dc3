"""Block-FP8 weight quantization (the reverse of ``weight_dequant``): torch reference.

Per ``block`` tile: ``s = max(amax(|x|), 1e-4) / 448`` (f32) or, for ue8m0, the smallest power of two with
``amax / s <= 448``; ``q = fp8_e4m3(x / s)``, round to nearest even, saturating at +-448. Partial edge tiles
use their real elements only (zero padding does not change amax).
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


def weight_quant_ref(
    x: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (F8_E4M3 values, F32 scales of the ceil grid)."""
    assert x.dim() == 2, x.shape
    s = scales_from_amax(block_amax(x, block), scale_fmt)
    q = (x.float() / expand_scales(s, tuple(x.shape), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s
