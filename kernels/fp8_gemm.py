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
from typing import NamedTuple

import torch

from . import _launch

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


class GemmConfig(NamedTuple):
    """How ``fp8_gemm`` tiles and schedules one product; the first five fields may be given by position."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: int = 0  # 1: tiles loaded by the TMA copy engine (tensor descriptors); 0: pointer loads
    persistent: int = 0  # TMA only, > 0: that many programs per SM, each looping over tiles
    prefetch: int = 0  # TMA only: load the next K step's scales one iteration ahead
    tma_store: int = 0  # TMA only: write the output tile through a tensor descriptor (asynchronous bulk store)
    group_m: int = 8  # tiles along M that walk one band of N together (L2 reuse of B)
    maxnreg: int = 0  # > 0: cap the registers per thread (168 lets three 4-warp CTAs share an SM)
    gluon: int = 0  # Hopper: the warp-specialized Gluon kernel (fp8_gemm_ws.py): block_m rows in two warpgroups
    split_k: int = 1  # > 1: that many programs per output tile, each over a share of K, summed in a fixed order
    pdl: int = 0  # Hopper: programmatic dependent launch (1: let the next kernel launch at once, 2: after the K loop)


# Tile configurations, chosen per problem by ``pick_config``; benchmarks/gpu_kernels.py sweeps them all and
# benchmarks/gpu_gemm_tune.py tunes the M >= 1024 schedule. Measured on an H200 (docs/benchmarks.md): from M = 1024
# the TMA kernel with 64 x 128 tiles and one warpgroup wins; several CTAs per SM overlap one CTA's scaling FMAs
# with another's tensor-core work, so the schedule is about occupancy. Three CTAs per SM (capped at 168 registers,
# three pipeline stages = 72 KB of shared memory each, persistent) win where K is short; where K is long, two
# (188 registers) with the scales prefetched and the output written by TMA. On Hopper, with Gluon, WS_128 beats
# both (fp8_gemm_ws.py: 128-row tiles shared by two independent warpgroups fed by a producer warp). Below
# M = 1024 (benchmarks/gpu_gemm_small.py) the pointer kernel, cheapest to launch, where its tiles fill the GPU,
# with programmatic dependent launch (``pdl=2``: its launch overlaps the previous kernel's end); where they do not,
# TMA tiles split along K (``split_k``; there dependent launch measured mixed, so it stays off).
SHORT_K = GemmConfig(64, 128, 4, 3, 1, persistent=3, maxnreg=168)
LONG_K = GemmConfig(64, 128, 4, 3, 1, persistent=2, prefetch=1, tma_store=1, group_m=32)
WS_128 = GemmConfig(128, 128, 4, 6, 1, persistent=1, gluon=1)
CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(16, 64, 4, 6),
    GemmConfig(32, 64, 4, 6),
    GemmConfig(64, 64, 4, 5),
    GemmConfig(64, 128, 4, 4),
    GemmConfig(64, 128, 4, 3, 1),
    GemmConfig(64, 128, 4, 4, 1),
    GemmConfig(128, 128, 8, 4, 1),
    SHORT_K,
    LONG_K,
    WS_128,
)


def pick_config(M: int, N: int, K: int, sms: int = 132) -> GemmConfig:
    """The tile configuration for an [M, K] x [N, K] product on a GPU of ``sms`` SMs (from the H200 sweeps).
    fp8_gemm calls it once per shape (its launch plans are cached)."""
    if M >= 1024:
        return WS_128  # where it cannot run (no Hopper, no Gluon, unaligned rows), fp8_gemm takes LONG_K or SHORT_K
    KB = -(-K // BLOCK_K)
    # Split-K where the output has too few tiles to fill the GPU (benchmarks/gpu_gemm_small.py, docs/benchmarks.md):
    # about two programs per SM, each K share at least 7 blocks deep (16 for 64 x 128 tiles, whose 112 tiles at
    # (128, 7168, 2048) run faster unsplit); at most 4 shares for 64-row tiles (each share writes and reads back its
    # partial tile), 8 for the small tiles of M <= 64.
    if M > 64:
        tiles = -(-M // 64) * -(-N // 64)
        if tiles <= sms:  # few tiles (a narrow weight, or few rows): 64 x 64 tiles by TMA, split along K
            return GemmConfig(64, 64, 4, 5, 1, split_k=max(1, min(2 * sms // tiles, KB // 7, 4)))
        tiles = -(-M // 64) * -(-N // 128)
        if tiles < sms and KB >= 32:  # 64 x 128 tiles short of one per SM, and K deep enough to share
            return GemmConfig(64, 128, 4, 4, 1, split_k=min(2 * sms // tiles, KB // 16, 4))
        return GemmConfig(64, 128, 4, 4, pdl=2)  # the pointer kernel: the cheapest launch, and the GPU is filled
    cfg = GemmConfig(16, 64, 4, 6) if M <= 16 else GemmConfig(32, 64, 4, 6) if M <= 32 else GemmConfig(64, 64, 4, 5)
    tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    if 2 * tiles <= sms:
        return cfg._replace(split_k=max(1, min(2 * sms // tiles, KB // 7, 8)))
    return cfg._replace(pdl=2)


def _check_device(t: torch.Tensor) -> None:
    """Triton runs CUDA tensors; CPU tensors only under its interpreter (``TRITON_INTERPRET=1``)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {t.device}); use fp8_gemm_ref on the CPU")


_kernel = None


def _build():
    # The helpers become module globals: Triton resolves a kernel's callees through its module's globals.
    global _tile_coords, _scaled, _store_tile, _work_item, _pdl_wait, _pdl_trigger
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _pdl_wait(PDL):  # PDL: a constexpr from the caller
        # Programmatic dependent launch: the kernel may start while the previous one in the stream finishes; nothing
        # global is read or written before the previous kernel has completed and its writes are visible.
        if PDL:
            gdc_wait()
            if PDL == 1:  # the next kernel may launch now (its programs wait in _pdl_wait for this one to end)
                gdc_launch_dependents()

    @triton.jit
    def _pdl_trigger(PDL):
        if PDL == 2:  # the next kernel may launch once every program is past its K loop
            gdc_launch_dependents()

    @triton.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M):  # GROUP_M: a constexpr from the caller
        # Grouped ordering: GROUP_M consecutive tiles walk down M over the same N band, so B tiles stay in L2.
        group = tile // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % size_m), (tile % (GROUP_M * num_n)) // size_m

    @triton.jit
    def _scaled(p, a_s, b_s, ROW_SCALE):  # ROW_SCALE: a constexpr from the caller
        # One K step's product times its two block scales. The scales change at every K step, so each step is
        # scaled before it is accumulated (in f32 on the CUDA cores: this also bounds the FP8 tensor cores' short
        # accumulation to 128 terms). With ROW_SCALE one weight scale covers the tile: a per-row factor.
        if ROW_SCALE:
            return p * (a_s * b_s)[:, None]
        else:
            return p * (a_s[:, None] * b_s[None, :])

    @triton.jit
    def _work_item(item, tiles, KB, SPLIT_K):  # SPLIT_K: a constexpr from the caller
        # Work item -> (output tile, split, its K blocks [kb_lo, kb_hi)): split s takes blocks s*KB//S to
        # (s+1)*KB//S, so the shares differ by at most one block. Without split-K, the item is the tile.
        if SPLIT_K == 1:
            return item, 0, 0, KB
        else:
            split = item // tiles
            return item % tiles, split, split * KB // SPLIT_K, (split + 1) * KB // SPLIT_K

    @triton.jit
    def _store_tile(c_ptr, ws_ptr, cnt_ptr, acc, tile, split, offs_m, offs_n, M, N, stride_cm, SPLIT_K):
        # Writes one output tile. With SPLIT_K > 1 the program holds one of SPLIT_K partial sums over K: it leaves
        # it in the f32 workspace [SPLIT_K, M, N] and counts itself in on the tile's counter; the last of the
        # tile's programs to arrive adds the partials in split order 0, 1, ... (the same order whichever program
        # comes last: the result is deterministic), writes the tile, and resets the counter for the next call.
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT_K > 1:
            part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(part + split * M * N, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the counter moves (release, GPU scope)
            if tl.atomic_add(cnt_ptr + tile, 1) == SPLIT_K - 1:  # acquire: the other partials are visible
                acc = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                         mask=mask)  # fmt: skip
                tl.store(cnt_ptr + tile, 0)
        else:
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def fp8_gemm_kernel(
        a_ptr,  # [M, K] float8_e4m3fn activations, row-major (unit stride along K)
        b_ptr,  # [N, K] float8_e4m3fn weights, row-major
        c_ptr,  # [M, N] output (bf16 or f32), row-major
        ws_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N] f32 partial sums; cnt_ptr: one int32 counter per tile, zero
        cnt_ptr,
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
        SPLIT_K: tl.constexpr,  # programs per tile, each summing an equal share of the K blocks (split-K)
        PDL: tl.constexpr,  # programmatic dependent launch (GemmConfig.pdl); 0 under the interpreter
    ):
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        tile, split, kb_lo, kb_hi = _work_item(tl.program_id(0), num_m * num_n, KB, SPLIT_K)
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows/columns past the edge are clamped to a valid row (their results are masked at the store); this keeps
        # the loads unmasked along M and N.
        rows_a = tl.minimum(offs_m, M - 1)
        rows_b = tl.minimum(offs_n, N - 1)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + kb_lo * BLOCK_K + offs_k[None, :]
        b_ptrs = b_ptr + rows_b[:, None] * stride_bn + kb_lo * BLOCK_K + offs_k[None, :]
        a_s_ptrs = a_s_ptr + rows_a * KB
        b_s_ptrs = (b_s_ptr + (pid_n * BLOCK_N // SB_N) * KB) if ROW_SCALE else (b_s_ptr + (rows_b // SB_N) * KB)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        _pdl_wait(PDL)
        for kb in range(kb_lo, kb_hi):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:  # the ragged last K block reads zeros past K (its scales cover the real channels only)
                a = tl.load(a_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_K, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_K, other=0.0)
            acc += _scaled(tl.dot(a, tl.trans(b)), tl.load(a_s_ptrs + kb), tl.load(b_s_ptrs + kb), ROW_SCALE)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _pdl_trigger(PDL)
        _store_tile(c_ptr, ws_ptr, cnt_ptr, acc, tile, split, offs_m, offs_n, M, N, stride_cm, SPLIT_K)

    @triton.jit
    def fp8_gemm_tma_kernel(
        a_desc,  # tensor descriptor of A [M, K] float8_e4m3fn, block [BLOCK_M, BLOCK_K]; zero fill past the edges
        b_desc,  # tensor descriptor of B [N, K] float8_e4m3fn, block [BLOCK_N, BLOCK_K]
        c,  # TMA_STORE: tensor descriptor of C [M, N], block [BLOCK_M, BLOCK_N]; else C's pointer (row-major)
        ws_ptr,  # SPLIT_K > 1: the partial sums and tile counters, as in fp8_gemm_kernel
        cnt_ptr,
        a_s_ptr,  # [M, KB] f32 activation scales
        b_s_ptr,  # [ceil(N / SB_N), KB] f32 weight block scales
        M,
        N,
        stride_cm,
        KB,
        num_programs,  # programs in the grid: program p does work items p, p + num_programs, ...
        SB_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        ROW_SCALE: tl.constexpr,
        PREFETCH: tl.constexpr,  # load the next K step's scales one iteration ahead
        TMA_STORE: tl.constexpr,  # only with SPLIT_K == 1
        SPLIT_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # The same product as fp8_gemm_kernel, with tiles brought in by the bulk tensor copy engine (TMA), which
        # also zero-fills ragged edges, so no masks or clamped addresses are needed. With as many programs as
        # tiles each program does one tile; a persistent grid (a few programs per SM) loops over them.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        _pdl_wait(PDL)
        for item in tl.range(tl.program_id(0), num_m * num_n * SPLIT_K, num_programs):  # (split, tile) pairs
            tile, split, kb_lo, kb_hi = _work_item(item, num_m * num_n, KB, SPLIT_K)
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            a_s_ptrs = a_s_ptr + tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1) * KB
            if ROW_SCALE:
                b_s_ptrs = b_s_ptr + (pid_n * BLOCK_N // SB_N) * KB
            else:
                b_s_ptrs = b_s_ptr + (tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1) // SB_N) * KB
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if PREFETCH:
                sa_next = tl.load(a_s_ptrs + kb_lo)
                sb_next = tl.load(b_s_ptrs + kb_lo)
            for kb in range(kb_lo, kb_hi):
                a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
                if PREFETCH:
                    sa = sa_next
                    sb = sb_next
                    sa_next = tl.load(a_s_ptrs + tl.minimum(kb + 1, KB - 1))
                    sb_next = tl.load(b_s_ptrs + tl.minimum(kb + 1, KB - 1))
                else:
                    sa = tl.load(a_s_ptrs + kb)
                    sb = tl.load(b_s_ptrs + kb)
                acc += _scaled(tl.dot(a, tl.trans(b)), sa, sb, ROW_SCALE)
            _pdl_trigger(PDL)
            if TMA_STORE:
                c.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c.dtype))
            else:
                offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                _store_tile(c, ws_ptr, cnt_ptr, acc, tile, split, offs_m, offs_n, M, N, stride_cm, SPLIT_K)

    return fp8_gemm_kernel, fp8_gemm_tma_kernel


_NUM_SMS: dict[int, int] = {}
_SPLIT: dict = {}  # (device, stream) -> (f32 workspace, int32 tile counters) of split-K launches


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: a tiny "GPU", so that persistent programs loop over several tiles
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _split_buffers(n: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A split-K launch's f32 workspace (at least ``n`` elements) and its tile counters, then their addresses (both
    allocations start 256-byte aligned), kept per stream: launches on one stream run one after another, each leaves
    every counter at zero, and the workspace is only read by the launch that wrote it. (So a CUDA graph captured
    with split-K must not be replayed concurrently with split-K calls on its capture stream.)"""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key = (idx, torch._C._cuda_getCurrentRawStream(idx))
    else:
        key = (device, 0)
    ws, cnt, pws, pcnt = _SPLIT.get(key, (None, None, 0, 0))
    if ws is None or ws.numel() < n or cnt.numel() < tiles:
        ws = torch.empty(max(n, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 1024, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _SPLIT[key] = ws, cnt, ws.data_ptr(), cnt.data_ptr()
    return _SPLIT[key]


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = (128, 128),
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Triton version of ``fp8_gemm_ref`` (same contract); ``config`` (a ``GemmConfig``) overrides ``pick_config``."""
    # Every line here runs on each call, and at small M the host's time per call exceeds the kernel's (8 us at
    # M = 128; a torch call costs 1-3 us on the VMs measured): no work that a 2-D contiguous input does not need.
    global _kernel
    if not a.is_cuda:
        _check_device(a)
    if block[1] != BLOCK_K:
        raise ValueError(f"fp8_gemm needs {BLOCK_K}-wide K blocks, got block {block}")
    if _kernel is None:
        _kernel = _build()
    K = a.shape[-1]
    N = b.shape[0]
    a2 = a if a.dim() == 2 else a.reshape(-1, K)
    a_s2 = a_s if a_s.dim() == 2 else a_s.reshape(-1, a_s.shape[-1])
    if not a2.stride(-1) == 1:
        a2 = a2.contiguous()
    if not a_s2.is_contiguous():
        a_s2 = a_s2.contiguous()
    if not b.stride(-1) == 1:
        b = b.contiguous()
    if not b_s.is_contiguous():
        b_s = b_s.contiguous()
    M = a2.shape[0]
    KB = -(-K // BLOCK_K)
    if not (b.shape[1] == K and a_s2.shape == (M, KB) and b_s.shape == (-(-N // block[0]), KB)):
        raise ValueError(f"fp8_gemm: shapes do not match: a {a.shape}, a_s {a_s.shape}, b {b.shape}, b_s {b_s.shape}")
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M and N:
        _launch_gemm(a2, a_s2, b, b_s, c, M, N, K, KB, block[0], None if config is None else GemmConfig(*config))
    return c if a.dim() == 2 else c.reshape(*a.shape[:-1], N)


class _Plan(NamedTuple):
    """What a call does, worked out once per shape, dtypes, strides, alignment and config (``_PLANS``)."""

    kind: int  # 0: the pointer kernel, 1: the TMA kernel, 2: the Gluon kernel (fp8_gemm_ws)
    cfg: GemmConfig
    programs: int
    split: int
    tiles: int
    tma_store: bool
    const: dict
    opts: dict


_PLANS: dict = {}


def _plan(M: int, N: int, K: int, KB: int, sb_n: int, c_size: int, aligned: bool, device, config) -> _Plan:
    sms = _num_sms(device)
    cfg = pick_config(M, N, K, sms) if config is None else config
    if cfg.gluon:
        from . import fp8_gemm_ws

        if aligned and sb_n % cfg.block_n == 0 and (N * c_size) % 16 == 0 and fp8_gemm_ws.available(device):
            programs = min(-(-M // cfg.block_m) * -(-N // cfg.block_n), cfg.persistent * sms)
            return _Plan(2, cfg, programs, 1, 0, False, {}, {})
        cfg = LONG_K if K >= 4096 else SHORT_K  # no Hopper Gluon here: the Triton kernel's schedule
    bm, bn = cfg.block_m, cfg.block_n
    tiles = -(-M // bm) * -(-N // bn)
    split = max(1, min(cfg.split_k, KB))
    if split > 1 and split * M * N >= 2**31:  # the kernel indexes the workspace with 32-bit integers
        split = 1
    const = dict(SB_N=sb_n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m)
    opts = dict(num_warps=cfg.warps, num_stages=cfg.stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    pdl = cfg.pdl if cfg.pdl and _capability(device) >= (9, 0) else 0  # Hopper on; the interpreter has no device
    if pdl:
        opts["launch_pdl"] = True
    row_scale = sb_n % bn == 0
    if cfg.tma and aligned:
        tma_store = bool(cfg.tma_store) and split == 1 and (N * c_size) % 16 == 0
        programs = min(tiles * split, cfg.persistent * sms) if cfg.persistent else tiles * split
        const.update(ROW_SCALE=row_scale, PREFETCH=bool(cfg.prefetch), TMA_STORE=tma_store, SPLIT_K=split, PDL=pdl)
        return _Plan(1, cfg, programs, split, tiles, tma_store, const, opts)
    const.update(GROUP_M=8, EVEN_K=K % BLOCK_K == 0, ROW_SCALE=row_scale, SPLIT_K=split, PDL=pdl)
    return _Plan(0, cfg, tiles * split, split, tiles, False, const, opts)


def _tma_descriptor(t: torch.Tensor, ptr: int, shape: tuple, row_stride: int, block: tuple, cuda: bool):
    """A TMA descriptor over the 2-D ``t`` at ``ptr``: on the GPU (``cuda``) over its address, built once
    (_launch.descriptor); under the interpreter over the tensor itself, which the interpreter reads through it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if cuda:
        return _launch.descriptor(TensorDescriptor, ptr, t.dtype, shape, (row_stride, 1), block)
    return TensorDescriptor(t, list(shape), [row_stride, 1], list(block))


def _launch_gemm(a2, a_s2, b, b_s, c, M, N, K, KB, sb_n, config) -> None:
    sa, sb = a2.stride(0), b.stride(0)
    pa, pb, pc, pas, pbs = a2.data_ptr(), b.data_ptr(), c.data_ptr(), a_s2.data_ptr(), b_s.data_ptr()
    # Triton specializes each pointer on its 16-byte alignment; the copy engine (TMA, Gluon) needs it too.
    align = (pa % 16 == 0, pb % 16 == 0, pc % 16 == 0, pas % 16 == 0, pbs % 16 == 0)
    devices = (a2.get_device(), b.get_device(), a_s2.get_device(), b_s.get_device())
    key = (M, N, K, sb_n, sa, sb, c.dtype, a2.dtype, b.dtype, a_s2.dtype, b_s.dtype, align, devices, config)
    plan = _PLANS.get(key)
    if plan is None:
        if devices.count(devices[0]) != 4:  # the launch passes bare addresses: they must all be this GPU's
            raise ValueError(f"fp8_gemm: operands on different devices: a, b, a_s, b_s on {devices} (-1: CPU)")
        if len(_PLANS) > 4096:
            _PLANS.clear()
        aligned = (K | sa | sb) % 16 == 0 and align[0] and align[1]  # the copy engine's rows and bases
        plan = _PLANS[key] = _plan(M, N, K, KB, sb_n, c.element_size(), aligned, a2.device, config)
    # From here the plan's key fixes every argument's specialization, alignment included, and that all operands
    # are on one device: the launch passes the tensors' addresses (_launch.launch's ``static``).
    cfg = plan.cfg
    if plan.kind == 2:
        from . import fp8_gemm_ws

        fp8_gemm_ws.launch(
            a2, b, c, a_s2, b_s, M, N, K, KB, sb_n, plan.programs, cfg.block_m, cfg.block_n, cfg.stages,
            cfg.group_m, pdl=cfg.pdl, static=key, ptrs=(pa, pb, pc, pas, pbs),  # Gluon runs on Hopper only
        )  # fmt: skip
        return
    if plan.split == 1:
        ws, cnt, pws, pcnt = c, c, pc, pc
    else:
        ws, cnt, pws, pcnt = _split_buffers(plan.split * M * N, plan.tiles, a2.device)
    if plan.kind == 1:
        bm, bn, cuda = cfg.block_m, cfg.block_n, c.is_cuda
        a_desc = _tma_descriptor(a2, pa, (M, K), sa, (bm, BLOCK_K), cuda)
        b_desc = _tma_descriptor(b, pb, (N, K), sb, (bn, BLOCK_K), cuda)
        c_arg = _tma_descriptor(c, pc, (M, N), N, (bm, bn), cuda) if plan.tma_store else c
        args = (a_desc, b_desc, c_arg, ws, cnt, a_s2, b_s, M, N, N, KB, plan.programs)
        addresses = (a_desc, b_desc, c_arg if plan.tma_store else pc, pws, pcnt, pas, pbs, *args[7:])
    else:
        args = (a2, b, c, ws, cnt, a_s2, b_s, M, N, K, sa, sb, N, KB)
        addresses = (pa, pb, pc, pws, pcnt, pas, pbs, M, N, K, sa, sb, N, KB)
    _launch.launch(_kernel[plan.kind], (plan.programs,), args, plan.const, key, addresses, **plan.opts)
