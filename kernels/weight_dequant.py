"""Block-FP8 weight dequantization: ``W_bf16[i, j] = bf16(f32(W[i, j]) * S[i // B0, j // B1])``.

``weight_dequant_ref`` is the plain-torch reference (the test oracle and a CPU path). One rounding, f32 to
bf16, round to nearest even; ragged edge blocks use the ceil grid of ``S``. ``weight_dequant`` runs the Triton
``weight_dequant_kernel`` on CUDA tensors and gives the same bytes (checked on an H200, tests/test_gpu.py).
"""

from __future__ import annotations

import os

import torch

from . import _launch


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Dequantize a 2-D F8_E4M3 weight with its F32 block scales to BF16 (plain torch)."""
    assert w.dim() == 2 and s.dim() == 2, (w.shape, s.shape)
    M, N = w.shape
    b0, b1 = block
    assert s.shape == (-(-M // b0), -(-N // b1)), (w.shape, s.shape, block)
    full = s.float().repeat_interleave(b0, 0)[:M].repeat_interleave(b1, 1)[:, :N]
    return (w.float() * full).to(torch.bfloat16)


def _check_device(t: torch.Tensor) -> None:
    """Triton runs CUDA tensors; CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); use weight_dequant_ref on the CPU")


_kernel = None

# (rows, columns, warps) per program. Rows must divide the block height, so that a program's rows share one row of
# scales; the benchmark sweeps the alternatives (benchmarks/gpu_kernels.py).
TILE = (16, 1024, 4)


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def weight_dequant_kernel(
        w_ptr,  # [M, N] float8_e4m3fn weight, row-major
        s_ptr,  # [ceil(M / B0), ceil(N / B1)] f32 block scales, row-major
        y_ptr,  # [M, N] output (bf16, or f32 for exact checks under the interpreter), row-major
        M,
        N,
        SN,  # columns of s
        B0: tl.constexpr,  # block height (128)
        B1: tl.constexpr,  # block width (128)
        TILE_M: tl.constexpr,  # divides B0: all rows of a tile lie in one block row
        TILE_N: tl.constexpr,
        WIDE: tl.constexpr,  # M * N >= 2**31: 64-bit element offsets
    ):
        pid_m = tl.program_id(0)
        offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)
        offs_n = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
        mask_n = offs_n < N
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        if WIDE:
            offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        else:
            offs = offs_m[:, None] * N + offs_n[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # One scale per column block of this tile's block row, broadcast down the rows (L1-resident).
        s = tl.load(s_ptr + (pid_m * TILE_M // B0) * SN + offs_n // B1, mask=mask_n, other=0.0)
        # f32 product, then one rounding to the output dtype (round to nearest even on the GPU).
        tl.store(y_ptr + offs, (w * s[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    return weight_dequant_kernel


def weight_dequant(
    w: torch.Tensor,
    s: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Triton version of ``weight_dequant_ref``: bit-identical BF16 on a GPU. ``out_dtype=torch.float32`` gives the
    unrounded products (used to check the kernel exactly under the Triton interpreter, whose bf16 stores truncate)."""
    global _kernel
    _check_device(w)
    assert w.dim() == 2 and s.dim() == 2, (w.shape, s.shape)
    M, N = w.shape
    b0, b1 = block
    if s.shape != (-(-M // b0), -(-N // b1)):
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} with blocks {block}")
    if _kernel is None:
        _kernel = _build()
    w = w.contiguous()
    s = s.float().contiguous()
    y = torch.empty((M, N), dtype=out_dtype, device=w.device)
    if M and N:
        tm, tn, warps = tile or TILE
        while b0 % tm:  # a block height that is not a multiple of the tile: fall back to smaller powers of two
            tm //= 2
        grid = (-(-M // tm), -(-N // tn))
        const = dict(B0=b0, B1=b1, TILE_M=tm, TILE_N=tn, WIDE=M * N >= 2**31)
        _launch.launch(_kernel, grid, (w, s, y, M, N, s.shape[1]), const, num_warps=warps)
    return y
