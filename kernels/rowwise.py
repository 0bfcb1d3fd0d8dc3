"""Batch-invariant kernels for the decoding step: a row's result does not depend on how many rows the call has.

Why: cuBLAS and torch's CUDA reductions choose their tiling, their split of K and their reduction trees from the
problem's size, so the same row rounds differently in a call of 1 row and in one of 2. Speculative decoding's
verify step feeds two rows per sequence (its last token and the draft) where plain decoding feeds one, and a
sequence's output also depends on which other sequences share its batch. With these kernels every row of a decode
step is computed by the same instructions in the same order whatever the row count, so ``--speculative mtp`` gives
plain greedy decoding's tokens bit for bit, in BF16 as in F32, and a prompt's tokens do not depend on its batch.

Each kernel fixes its tiles from the weight's shape only (never from the row count), has no split along the rows'
reduction that depends on the row count, and marks the row count ``do_not_specialize`` so that one compiled kernel
serves every row count:

- ``matmul(x, w)``: ``y = x @ w.T``, optionally batched over a leading group dimension with any strides (the
  absorbed attention's per-head products), F32 accumulation in ``BK``-wide steps; F32 operands multiply in IEEE F32.
- ``rms_norm(x, w, eps)``: one program per row, the whole row in one block.
- ``mla_decode(...)``: MLA attention of one new token per row over its sequence's cached latent, up to the row's own
  position only (not the attended length of the step), flash-style (online softmax over fixed position blocks).
- ``choice_sum(y, w)``: the routed experts' outputs of a row weighted and summed in choice order.

The plain-torch paths (``model.py``) are their references; ``tests/test_kernels.py`` checks both values and
invariance under the interpreter, ``tests/test_gpu.py`` on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from . import _launch
from .fp8_gemm import _num_sms, pick_config  # (_num_sms: 2 under the interpreter)

BM = 16  # rows per matmul program (the smallest tensor-core tile)

_kernels: dict = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpret():
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); the CPU runs the torch path")


def _build() -> dict:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def matmul_kernel(
        x_ptr, w_ptr, y_ptr,
        M, N, K,
        sxg, sxm, sxk,  # x [G, M, K] strides
        swg, swn, swk,  # w [G, N, K] strides
        syg, sym, syn,  # y [G, M, N] strides
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        DOT: tl.constexpr,  # operand dtype of the product (f32 under the interpreter, whose bf16 dot is wrong)
    ):  # fmt: skip
        pm, pn, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        xp = x_ptr + g * sxg + rm[:, None] * sxm + rk[None, :] * sxk
        wp = w_ptr + g * swg + rn[:, None].to(tl.int64) * swn + rk[None, :] * swk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kin = rk[None, :] < K - k0
            a = tl.load(xp, mask=(rm[:, None] < M) & kin, other=0.0)
            b = tl.load(wp, mask=(rn[:, None] < N) & kin, other=0.0)
            acc = tl.dot(a.to(DOT), tl.trans(b.to(DOT)), acc, input_precision="ieee")
            xp += BK * sxk
            wp += BK * swk
        yp = y_ptr + g * syg + rm[:, None] * sym + rn[None, :] * syn
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, y_ptr, H, sx, sy, eps, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        v = tl.load(x_ptr + r * sx + offs, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(v * v, axis=0) / H + eps)
        wv = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * sy + offs, (wv * (v * inv)).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def mla_decode_kernel(
        ql_ptr, qp_ptr, c_ptr, o_ptr, slot_ptr, pos_ptr,
        NH, C, R,
        sqlb, sqlh, sqpb, sqph, scs, scp, sob, soh,
        scale,
        BH: tl.constexpr, BS: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
        hm = offs_h < NH
        offs_c = tl.arange(0, CP)
        offs_r = tl.arange(0, RP)
        cm, rmask = offs_c < C, offs_r < R
        slot = tl.load(slot_ptr + b).to(tl.int64)
        p = tl.load(pos_ptr + b).to(tl.int32)
        q1 = tl.load(ql_ptr + b * sqlb + offs_h[:, None] * sqlh + offs_c[None, :], mask=hm[:, None] & cm[None, :],
                     other=0.0).to(DOT)  # fmt: skip
        q2 = tl.load(qp_ptr + b * sqpb + offs_h[:, None] * sqph + offs_r[None, :], mask=hm[:, None] & rmask[None, :],
                     other=0.0).to(DOT)  # fmt: skip
        base = c_ptr + slot * scs
        m_i = tl.full((BH,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BH,), dtype=tl.float32)
        acc = tl.zeros((BH, CP), dtype=tl.float32)
        for s0 in range(0, p + 1, BS):
            offs_s = s0 + tl.arange(0, BS)
            sm = offs_s <= p
            row = base + offs_s[:, None].to(tl.int64) * scp
            kc = tl.load(row + offs_c[None, :], mask=sm[:, None] & cm[None, :], other=0.0)
            kr = tl.load(row + C + offs_r[None, :], mask=sm[:, None] & rmask[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(kc.to(DOT)), input_precision="ieee")
            s = tl.dot(q2, tl.trans(kr.to(DOT)), s, input_precision="ieee")
            s = tl.where(sm[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            e = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(e.to(kc.dtype).to(DOT), kc.to(DOT), acc, input_precision="ieee")
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * sob + offs_h[:, None] * soh + offs_c[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=hm[:, None] & cm[None, :])  # fmt: skip

    @triton.jit
    def choice_sum_kernel(y_ptr, w_ptr, o_ptr, K, H, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, K):
            wj = tl.load(w_ptr + r * K + j).to(tl.float32)
            acc += tl.load(y_ptr + (r * K + j) * H + offs, mask=m, other=0.0).to(tl.float32) * wj
        tl.store(o_ptr + r * H + offs, acc.to(o_ptr.dtype.element_ty), mask=m)

    return dict(matmul=matmul_kernel, rms=rms_norm_kernel, mla=mla_decode_kernel, choice=choice_sum_kernel)


def _k(name: str):
    if not _kernels:
        _kernels.update(_build())
    return _kernels[name]


def _dot_dtype(t: torch.Tensor):
    import triton.language as tl

    if t.dtype == torch.float32 or _interpret():
        return tl.float32
    return tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16


@functools.lru_cache(maxsize=1024)
def tiles(N: int, K: int, dtype: torch.dtype, device: torch.device, groups: int = 1) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) for a weight [groups, N, K]: from the weight's shape and the GPU only, never from the
    row count. The widest column tile that still gives every SM a program (a decode step reads each weight once, so
    what counts is that all SMs stream it); F32 (the router) in shorter K steps."""
    sms = _num_sms(device)
    bn = next((b for b in (64, 32) if groups * -(-N // b) >= sms), 16)
    if dtype == torch.float32:
        return bn, 32, 4, 3
    return bn, 128, 4, 4


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` in ``x``'s dtype: ``x`` [M, K] and ``w`` [N, K], or ``x`` [G, M, K] and ``w`` [G, N, K] (any
    strides; ``out`` [G, M, N] may be a strided view to write into). Each row's result is independent of M."""
    _check_device(x)
    if x.dtype != w.dtype:
        raise ValueError(f"matmul needs one dtype, got {x.dtype} and {w.dtype}")
    flat = x.dim() == 2
    x3, w3 = (x[None], w[None]) if flat else (x, w)
    G, M, K = x3.shape
    N = w3.shape[1]
    if w3.shape[0] != G or w3.shape[2] != K:
        raise ValueError(f"matmul: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    if out is None:
        out = torch.empty((G, M, N) if not flat else (M, N), dtype=x.dtype, device=x.device)
    y3 = out[None] if out.dim() == 2 else out
    if M == 0:
        return out
    bn, bk, warps, stages = tiles(N, K, x.dtype, x.device, G)
    grid = (-(-M // BM), -(-N // bn), G)
    args = (x3, w3, y3, M, N, K, *x3.stride(), *w3.stride(), *y3.stride())
    const = dict(BM=BM, BN=bn, BK=bk, DOT=_dot_dtype(x))
    _launch.launch(_k("matmul"), grid, args, const, num_warps=warps, num_stages=stages)
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim in F32, in ``x``'s dtype; one program per row."""
    import triton

    _check_device(x)
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], H), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(H)
        args = (x2, w, y, H, x2.stride(0), y.stride(0), float(eps))
        _launch.launch(_k("rms"), (x2.shape[0],), args, dict(BLOCK=block), num_warps=8 if block >= 4096 else 4)
    return y.view(x.shape)


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """MLA over the cache for one new token per row: ``q_lat`` [B, heads, C] (the query's nope part through kv_b's
    key part), ``q_pe`` [B, heads, R] (rotated), ``cache`` [slots, max_len, C + R] (one layer's latent and rope key
    rows), ``slots`` and ``positions`` [B]. Row b attends to positions ``0 .. positions[b]`` of slot ``slots[b]``;
    returns the softmax-weighted latent [B, heads, C] in ``q_lat``'s dtype."""
    import triton

    _check_device(q_lat)
    B, NH, C = q_lat.shape
    R = q_pe.shape[-1]
    if cache.shape[-1] != C + R or cache.stride(-1) != 1 or q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1:
        raise ValueError(f"mla_decode: cache {tuple(cache.shape)} for C={C}, R={R}, unit last strides")
    o = torch.empty((B, NH, C), dtype=q_lat.dtype, device=q_lat.device)
    if B == 0:
        return o
    bh = 16
    cp, rp = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(R))
    args = (
        q_lat, q_pe, cache, o, slots, positions, NH, C, R,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0), cache.stride(1),
        o.stride(0), o.stride(1), float(scale),
    )  # fmt: skip
    const = dict(BH=bh, BS=32, CP=cp, RP=rp, DOT=_dot_dtype(q_lat))
    _launch.launch(_k("mla"), (B, -(-NH // bh)), args, const, num_warps=4, num_stages=2)
    return o


def choice_sum(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j y[:, j] * w[:, j]`` for ``y`` [n, k, H] and ``w`` [n, k]: F32 products and sums in choice order, in
    ``y``'s dtype."""
    _check_device(y)
    n, k, H = y.shape
    y = y.contiguous()
    w = w.float().contiguous()
    out = torch.empty((n, H), dtype=y.dtype, device=y.device)
    if n:
        block = 1024
        _launch.launch(_k("choice"), (n, -(-H // block)), (y, w, out, k, H), dict(BLOCK=block), num_warps=4)
    return out


@functools.lru_cache(maxsize=1024)
def fp8_config(N: int, K: int, device: torch.device):
    """A fixed ``fp8_gemm`` tile configuration for a weight [N, K] (``pick_config``'s choice for up to 16 rows,
    whatever the row count): the FP8 path's batch-invariant GEMM."""
    return pick_config(1, N, K, _num_sms(device))
