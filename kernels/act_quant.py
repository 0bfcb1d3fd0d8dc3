"""Online activation quantization to FP8 E4M3, per token per ``block`` channels (1 x 128 groups).

For each row and each group of ``block`` consecutive channels: ``s = max(amax(|x|), 1e-4) / 448`` (f32), or for
``scale_fmt="ue8m0"`` that value rounded **up** to a power of two; ``q = fp8_e4m3(x / s)`` (correctly rounded
division, round to nearest even). A ragged last group uses its real channels only. Scales are returned as f32
of shape ``[..., ceil(K / block)]`` in both formats.

``act_quant_ref`` is the plain-torch reference (test oracle and CPU path); ``act_quant`` runs the Triton kernel.
"""

from __future__ import annotations

import os

import torch

from . import _launch
from .weight_quant import AMAX_FLOOR, FP8_MAX, pow2_ceil


def act_quant_ref(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of ``x`` in groups of ``block``: (F8_E4M3 values like ``x``, f32 scales)."""
    *lead, K = x.shape
    g = -(-K // block)
    xf = x.reshape(-1, K).float()
    pad = g * block - K
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    amax = xp.view(-1, g, block).abs().amax(dim=-1)
    # A tensor divisor: CUDA turns division by a Python scalar into multiplication by its reciprocal, which is
    # not correctly rounded; tensor / tensor is, on every device (and so is the kernel's div_rn).
    s = amax.clamp(min=AMAX_FLOOR) / torch.full_like(amax, FP8_MAX)
    if scale_fmt == "ue8m0":
        s = pow2_ceil(s)
    elif scale_fmt is not None:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}")
    y = (xp.view(-1, g, block) / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(-1, g * block)[:, :K]
    return y.to(torch.float8_e4m3fn).reshape(*lead, K), s.reshape(*lead, g)


def _check_device(t: torch.Tensor) -> None:
    """Triton runs CUDA tensors; CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); use act_quant_ref on the CPU")


_kernel = None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant_kernel(
        x_ptr,  # [M, K] input activations (any float dtype), unit stride along K
        y_ptr,  # [M, K] output, float8_e4m3fn, contiguous
        s_ptr,  # [M, G] output scales, f32, contiguous, G = ceil(K / BLOCK)
        M,  # rows (tokens)
        K,  # channels per row
        G,  # groups per row
        stride_x,  # row stride of x in elements
        ROWS: tl.constexpr,  # rows per program
        BLOCK: tl.constexpr,  # channels per group (128)
        UE8M0: tl.constexpr,  # round the scale up to a power of two
    ):
        # One program per (ROWS rows, one group): a group is the unit that shares a scale.
        offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        grp = tl.program_id(1)
        offs_k = grp * BLOCK + tl.arange(0, BLOCK)
        # The ragged last group reads its real channels only; its padding (0) leaves amax unchanged.
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))  # correctly rounded, like torch
        if UE8M0:
            # s is a normal f32 (>= 1e-4 / 448): round it up to a power of two by clearing the mantissa and, when
            # that was not already zero, adding one to the exponent; exact, unlike exp2(ceil(log2(s))).
            bits = s.to(tl.int32, bitcast=True)
            e = bits & 0x7F800000
            e = tl.where((bits & 0x007FFFFF) != 0, e + 0x00800000, e)
            s = e.to(tl.float32, bitcast=True)
        y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(y_ptr + offs_m[:, None] * K + offs_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + offs_m * G + grp, s, mask=offs_m < M)

    return act_quant_kernel


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``act_quant_ref`` (same contract; bit-identical on a GPU)."""
    global _kernel
    _check_device(x)
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}")
    if _kernel is None:
        _kernel = _build()
    *lead, K = x.shape
    x2 = x if len(lead) == 1 else x.reshape(-1, K)
    sx = x2.stride()
    if sx[1] != 1:
        x2 = x2.contiguous()
        sx = x2.stride()
    M = x2.shape[0]
    G = -(-K // block)
    y = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, G), dtype=torch.float32, device=x.device)
    if M:
        rows = 8
        grid = (triton_cdiv(M, rows), G)
        const = dict(ROWS=rows, BLOCK=block, UE8M0=scale_fmt == "ue8m0")
        args = (x2, y, s, M, K, G, sx[0])
        if x2.is_cuda:  # on the GPU: a key of its own and the addresses, as fp8_gemm does (_launch.launch)
            px, py, ps = x2.data_ptr(), y.data_ptr(), s.data_ptr()
            static = (M, K, G, sx[0], x2.dtype, block, scale_fmt, px % 16 == 0, py % 16 == 0, ps % 16 == 0)
            _launch.launch(_kernel, grid, args, const, static, (px, py, ps, M, K, G, sx[0]), num_warps=4)
        else:
            _launch.launch(_kernel, grid, args, const, num_warps=4)
    if len(lead) == 1:
        return y, s
    return y.reshape(*lead, K), s.reshape(*lead, G)
