"""Routed experts at decode time: each (token, expert) pair's row times its expert's weight, routing read on the GPU.

``moe_gemm(x, w, s, expert)`` computes ``y[p] = x[p] @ W[expert[p]].T`` for every pair ``p``, where ``W`` is a
stack of the experts' weights ``[E, N, K]``: BF16, or F8_E4M3 with its F32 block scales ``s`` ``[E, ceil(N / B0),
ceil(K / B1)]`` dequantized tile by tile as ``cast`` does (``bf16(f32(w) * s)``, the BF16 path's weights, never
materialized). ``moe_gemm_ref`` is the plain-torch reference (the test oracle and the CPU path).

Why a kernel: the eager MoE picks the chosen experts on the host (``torch.where`` then a loop), which a CUDA graph
cannot capture, and running every expert on every token (the graph-safe alternative) reads all of them. Here one
program per (expert, column block) reads its expert's tile only if some pair chose it (``counts[e] > 0``), and
multiplies it with all of that expert's rows at once (at most one row per token), so a step reads each chosen
expert's weights once, with fixed shapes and no host synchronization. Memory per step: the chosen experts' bytes.

Batch invariance (``invariant=True``, ``kernels/rowwise.py``): the row tile is 16 whatever the number of pairs,
one program per 16 of an expert's rows (the programs of one expert's further rows, if any, run next to each other
and find the weight tile in L2), so a row's result does not depend on how many other rows chose its expert.
"""

from __future__ import annotations

import os

import torch

BLOCK_N = 64  # output columns per program; divides the 128-row scale block of an FP8 weight
BLOCK_K = 128  # reduction step; one scale column of an FP8 weight per step


def moe_gemm_ref(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, expert: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """``y[p] = x[p] @ W[expert[p]].T`` for ``x`` [P, K] (P pairs), ``w`` [E, N, K] (BF16, or F8_E4M3 with block
    scales ``s`` [E, ceil(N / B0), ceil(K / B1)]); ``y`` [P, N] in ``x``'s dtype, accumulated in f32."""
    from .weight_dequant import weight_dequant_ref

    out = torch.empty((x.shape[0], w.shape[1]), dtype=x.dtype, device=x.device)
    for p in range(x.shape[0]):
        e = int(expert[p])
        we = weight_dequant_ref(w[e], s[e], block) if s is not None else w[e]
        out[p] = (x[p].float() @ we.float().T).to(x.dtype)
    return out


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); use moe_gemm_ref on the CPU")


_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def moe_gemm_kernel(
        x_ptr,  # [P, K] pair rows (bf16 or f32), row-major
        w_ptr,  # [E, N, K] expert weights (bf16, or float8_e4m3fn), row-major
        s_ptr,  # [E, SN, SK] f32 block scales (FP8 only; any pointer otherwise)
        y_ptr,  # [P, N] output, row-major
        order_ptr,  # [P] pair indices sorted by expert
        start_ptr,  # [E] first position in order of each expert's pairs
        count_ptr,  # [E] pairs per expert
        N,
        K,
        SN,  # rows of an expert's scale grid
        SK,  # columns of an expert's scale grid
        FP8: tl.constexpr,
        B0: tl.constexpr,  # scale block height (128)
        BM: tl.constexpr,  # rows per program, >= 16 for tl.dot (the pairs one expert can have, or 16: invariant)
        BN: tl.constexpr,  # divides B0: a program's columns share one row of scales
        BK: tl.constexpr,  # == B1: one scale per K step
        DOT: tl.constexpr,  # operand dtype of the product: the rows' dtype (bf16 or f32); f32 under the
        #                     interpreter, whose bf16 dot returns garbage (seen with Triton 3.9)
    ):
        t = tl.program_id(0) * BM
        e = tl.program_id(1)
        n0 = tl.program_id(2) * BN
        cnt = tl.load(count_ptr + e)
        if cnt > t:  # an expert nobody chose (or with no rows this far) costs one load
            first = tl.load(start_ptr + e) + t
            cnt = cnt - t
            slot = tl.arange(0, BM)
            valid = slot < cnt
            rows = tl.load(order_ptr + first + slot, mask=valid, other=0)
            offs_n = n0 + tl.arange(0, BN)
            offs_k = tl.arange(0, BK)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            w_base = w_ptr + e.to(tl.int64) * N * K
            for k0 in range(0, K, BK):
                kk = k0 + offs_k
                a = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
                b = tl.load(w_base + offs_n[:, None] * K + kk[None, :], mask=(offs_n[:, None] < N) & (kk[None, :] < K))
                if FP8:
                    sc = tl.load(s_ptr + (e * SN + n0 // B0) * SK + k0 // BK)
                    b = (b.to(tl.float32) * sc).to(tl.bfloat16)  # exactly the dequantized BF16 weight
                acc += tl.dot(a.to(DOT), tl.trans(b.to(DOT)), input_precision="ieee")
            tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=valid[:, None] & (offs_n[None, :] < N))  # fmt: skip

    return moe_gemm_kernel


def route(expert: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair indices sorted by expert, each expert's first position there, pairs per expert), on the device."""
    flat = expert.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    # (not bincount: on CUDA it reads the largest index back to the host, which a CUDA graph cannot hold)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return order, start, counts


def moe_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor | None,
    expert: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    max_per_expert: int | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """The Triton version of ``moe_gemm_ref`` (same arguments); ``max_per_expert`` bounds the pairs one expert can
    have (the tokens of the step: each chooses an expert once), default ``x.shape[0]``; ``invariant``: 16-row tiles
    whatever the pair count (see the module docstring)."""
    global _kernel
    import triton
    import triton.language as tl

    _check_device(x)
    P, K = x.shape
    E, N, K2 = w.shape
    assert K2 == K and expert.shape[0] == P, (x.shape, w.shape, expert.shape)
    fp8 = w.dtype == torch.float8_e4m3fn
    assert fp8 == (s is not None), (w.dtype, s is None)
    assert block[1] == BLOCK_K and block[0] % BLOCK_N == 0, block
    if _kernel is None:
        _kernel = _build()
    order, start, counts = route(expert, E)
    y = torch.empty((P, N), dtype=x.dtype, device=x.device)
    most = max(1, max_per_expert or P)
    bm = 16 if invariant else max(16, triton.next_power_of_2(most))
    scales = s if fp8 else counts  # any tensor for the unused pointer
    sn, sk = (s.shape[1], s.shape[2]) if fp8 else (1, 1)
    grid = (triton.cdiv(most, bm), E, triton.cdiv(N, BLOCK_N))
    _kernel[grid](
        x.contiguous(), w, scales, y, order, start, counts, N, K, sn, sk,
        FP8=fp8, B0=block[0], BM=bm, BN=BLOCK_N, BK=BLOCK_K,
        DOT=tl.bfloat16 if x.is_cuda and x.dtype == torch.bfloat16 else tl.float32,
        num_warps=4,
    )  # fmt: skip
    return y
