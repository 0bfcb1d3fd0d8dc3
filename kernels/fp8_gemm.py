"""Block-scaled FP8 matrix product: ``C = (A * a_s) @ (B * b_s).T`` with f32 accumulation.

``A`` [M, K] F8_E4M3 activations with per-row-per-128-channel scales ``a_s`` [M, ceil(K / 128)] (``act_quant``);
``B`` [N, K] F8_E4M3 weights with 128x128 block scales ``b_s`` [ceil(N / 128), ceil(K / 128)]. Each K step of
128 channels is one FP8 tensor-core product accumulated in f32, then multiplied by its two scales and added to
the f32 accumulator (the block scales change at every K block, so they cannot be folded out of the sum).

``fp8_gemm_ref`` is the plain-torch reference (test oracle and CPU path): it dequantizes both operands to f32
and multiplies in f32, the same function up to f32 rounding.
"""

from __future__ import annotations

import os

import torch

BLOCK_K = 128  # activation group and weight block width along K


def _expand(s: torch.Tensor, n: int, b: int, dim: int) -> torch.Tensor:
    return s.repeat_interleave(b, dim).narrow(dim, 0, n)


def fp8_gemm_ref(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Plain-torch block-scaled FP8 GEMM: ``a`` [..., K], ``b`` [N, K] -> [..., N] in ``out_dtype``."""
    *lead, K = a.shape
    N = b.shape[0]
    a2 = a.reshape(-1, K).float() * _expand(a_s.reshape(-1, a_s.shape[-1]).float(), K, block[1], 1)
    w = b.float() * _expand(_expand(b_s.float(), N, block[0], 0), K, block[1], 1)
    return (a2 @ w.T).to(out_dtype).reshape(*lead, N)


# Tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages, tma), chosen per problem by ``pick_config``; the
# benchmark sweeps them all. Measured on an H200 (docs/benchmarks.md): from M = 1024 the TMA kernel with 64 x 128
# tiles and one warpgroup wins (790-906 TFLOP/s; several CTAs per SM overlap one CTA's scaling FMAs with another's
# tensor-core work); below that the host-side descriptor costs more than it saves and the pointer kernel wins.
# Issuing two K steps' products before scaling either was tried and lost (480 against 690).
CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 64, 4, 6, 0),
    (16, 64, 4, 6, 1),
    (32, 64, 4, 6, 0),
    (64, 64, 4, 5, 0),
    (64, 128, 4, 3, 0),
    (64, 128, 4, 4, 0),
    (64, 128, 4, 3, 1),
    (64, 128, 4, 4, 1),
    (64, 128, 4, 5, 1),
    (64, 256, 8, 3, 1),
    (128, 128, 8, 3, 1),
    (128, 128, 8, 4, 1),
    (128, 256, 8, 3, 1),
)


def pick_config(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """The tile configuration for an [M, K] x [N, K] product (from the H200 sweep)."""
    if M <= 16:
        return (16, 64, 4, 6, 0)
    if M <= 32:
        return (32, 64, 4, 6, 0)
    if M <= 64:
        return (64, 64, 4, 5, 0)
    if M < 1024:
        return (64, 128, 4, 4, 0)
    return (64, 128, 4, 4, 1) if K >= 4096 else (64, 128, 4, 3, 1)


def _check_device(t: torch.Tensor) -> None:
    """Triton runs CUDA tensors; CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); use fp8_gemm_ref on the CPU")


_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_gemm_kernel(
        a_ptr,  # [M, K] float8_e4m3fn activations, row-major (unit stride along K)
        b_ptr,  # [N, K] float8_e4m3fn weights, row-major
        c_ptr,  # [M, N] output (bf16 or f32), row-major
        a_s_ptr,  # [M, KB] f32 activation scales, KB = ceil(K / BLOCK_K)
        b_s_ptr,  # [ceil(N / SB_N), KB] f32 weight block scales
        M,
        N,
        K,
        stride_am,  # row stride of a
        stride_bn,  # row stride of b
        stride_cm,  # row stride of c
        KB,  # K blocks (= columns of both scale tensors)
        SB_N: tl.constexpr,  # weight block height (128)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # = the scale block width along K (128)
        GROUP_M: tl.constexpr,  # programs along M that share a band of B, for L2 reuse
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks on the K loads
        ROW_SCALE: tl.constexpr,  # SB_N % BLOCK_N == 0: one weight scale per K step for the whole tile
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M consecutive programs walk down M over the same N band, so B tiles stay in L2.
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % size_m)
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows/columns past the edge are clamped to a valid row (their results are masked at the store); this keeps
        # the loads unmasked along M and N.
        rows_a = tl.minimum(offs_m, M - 1)
        rows_b = tl.minimum(offs_n, N - 1)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rows_b[:, None] * stride_bn + offs_k[None, :]
        a_s_ptrs = a_s_ptr + rows_a * KB
        b_s_ptrs = b_s_ptr + (rows_b // SB_N) * KB
        b_s_tile = b_s_ptr + (pid_n * BLOCK_N // SB_N) * KB
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:  # the ragged last K block reads zeros past K (its scales cover the real channels only)
                a = tl.load(a_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_K, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_K, other=0.0)
            # The block scales change at every K step, so each step's product is scaled before it is accumulated
            # (in f32 on the CUDA cores: this also bounds the FP8 tensor cores' short accumulation to 128 terms).
            if ROW_SCALE:  # a per-row factor: one FMA per accumulator element
                acc += tl.dot(a, tl.trans(b)) * (tl.load(a_s_ptrs + kb) * tl.load(b_s_tile + kb))[:, None]
            else:
                acc += tl.dot(a, tl.trans(b)) * (tl.load(a_s_ptrs + kb)[:, None] * tl.load(b_s_ptrs + kb)[None, :])
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c = acc.to(c_ptr.dtype.element_ty)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], c, mask=mask)

    @triton.jit
    def fp8_gemm_tma_kernel(
        a_desc,  # tensor descriptor of A [M, K] float8_e4m3fn, block [BLOCK_M, BLOCK_K]; zero fill past the edges
        b_desc,  # tensor descriptor of B [N, K] float8_e4m3fn, block [BLOCK_N, BLOCK_K]
        c_ptr,  # [M, N] output, row-major
        a_s_ptr,  # [M, KB] f32 activation scales
        b_s_ptr,  # [ceil(N / SB_N), KB] f32 weight block scales
        M,
        N,
        stride_cm,
        KB,
        SB_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        ROW_SCALE: tl.constexpr,
    ):
        # The same product as fp8_gemm_kernel, with tiles brought in by the bulk tensor copy engine (TMA), which
        # also zero-fills ragged edges, so no masks or clamped addresses are needed.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % size_m)
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        a_s_ptrs = a_s_ptr + tl.minimum(offs_m, M - 1) * KB
        b_s_ptrs = b_s_ptr + (tl.minimum(offs_n, N - 1) // SB_N) * KB
        b_s_tile = b_s_ptr + (pid_n * BLOCK_N // SB_N) * KB
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            if ROW_SCALE:
                acc += tl.dot(a, tl.trans(b)) * (tl.load(a_s_ptrs + kb) * tl.load(b_s_tile + kb))[:, None]
            else:
                acc += tl.dot(a, tl.trans(b)) * (tl.load(a_s_ptrs + kb)[:, None] * tl.load(b_s_ptrs + kb)[None, :])
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

    return fp8_gemm_kernel, fp8_gemm_tma_kernel


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = (128, 128),
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Triton version of ``fp8_gemm_ref`` (same contract); ``config`` overrides ``pick_config``."""
    global _kernel
    _check_device(a)
    if block[1] != BLOCK_K:
        raise ValueError(f"fp8_gemm needs {BLOCK_K}-wide K blocks, got block {block}")
    if _kernel is None:
        _kernel = _build()
    *lead, K = a.shape
    N = b.shape[0]
    a2 = a.reshape(-1, K)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    a_s2 = a_s.reshape(-1, a_s.shape[-1]).contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    b_s = b_s.contiguous()
    M = a2.shape[0]
    KB = -(-K // BLOCK_K)
    assert b.shape[1] == K and a_s2.shape == (M, KB) and b_s.shape == (-(-N // block[0]), KB), (
        a.shape,
        a_s.shape,
        b.shape,
        b_s.shape,
    )
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M and N:
        bm, bn, warps, stages, tma = config or pick_config(M, N, K)
        grid = (-(-M // bm) * -(-N // bn),)
        row_scale = block[0] % bn == 0
        # The copy engine needs 16-byte aligned rows (K % 16 == 0 for FP8) and a GPU.
        if tma and K % 16 == 0 and a.is_cuda and a2.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0:
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_desc = TensorDescriptor.from_tensor(a2, [bm, BLOCK_K])
            b_desc = TensorDescriptor.from_tensor(b, [bn, BLOCK_K])
            _kernel[1][grid](
                a_desc, b_desc, c, a_s2, b_s, M, N, c.stride(0), KB, SB_N=block[0], BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=BLOCK_K, GROUP_M=8, ROW_SCALE=row_scale, num_warps=warps, num_stages=stages,
            )  # fmt: skip
        else:
            _kernel[0][grid](
                a2, b, c, a_s2, b_s, M, N, K, a2.stride(0), b.stride(0), c.stride(0), KB, SB_N=block[0], BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=8, EVEN_K=K % BLOCK_K == 0, ROW_SCALE=row_scale,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
    return c.reshape(*lead, N)
