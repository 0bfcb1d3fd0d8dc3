"""Block-FP8 weight dequantization: ``W_bf16[i, j] = bf16(f32(W[i, j]) * S[i // B0, j // B1])``.

``weight_dequant_ref`` is the plain-torch reference (the test oracle and a CPU path). One rounding, f32 to
bf16, round to nearest even; ragged edge blocks use the ceil grid of ``S``.
"""

from __future__ import annotations

import torch


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Dequantize a 2-D F8_E4M3 weight with its F32 block scales to BF16 (plain torch)."""
    assert w.dim() == 2 and s.dim() == 2, (w.shape, s.shape)
    M, N = w.shape
    b0, b1 = block
    assert s.shape == (-(-M // b0), -(-N // b1)), (w.shape, s.shape, block)
    full = s.float().repeat_interleave(b0, 0)[:M].repeat_interleave(b1, 1)[:, :N]
    return (w.float() * full).to(torch.bfloat16)
