"""Hopper block-scaled FP8 GEMM in Gluon (Triton's explicit dialect), warp-specialized: the same contract and the same
arithmetic as ``fp8_gemm.fp8_gemm`` (each 128-deep K step is one FP8 tensor-core product, multiplied by its two
block scales and added to an f32 accumulator), on a schedule plain Triton does not produce.

- One CTA per SM (persistent), three partitions of its warps (``gl.warp_specialize``):
  - a producer warp issues every TMA load into a ``STAGES``-deep shared-memory ring (6 x 32 KB); a ``ready``
    mbarrier per slot says the slot's tiles have landed, an ``empty`` one that both consumers are done with it.
    It runs up to ``STAGES`` K steps ahead, across tile boundaries, so a new tile starts on loaded data;
  - two consumer warpgroups, each on 64 rows of the same 128 x 128 output tile. They share the weight tile of
    each K step (a 64-row tile would fetch it for every 64 rows: half again as many bytes from L2 per product)
    and synchronize only through the ring's barriers, so while one scales its product on the CUDA cores the
    other's product runs on the tensor cores. (Plain Triton puts both warpgroups of a 128-row tile in lockstep,
    so the tensor cores idle during the scaling FMAs, and the schedules of ``fp8_gemm`` instead run three
    64-row CTAs per SM.)
- Each consumer waits for its K step's product, releases the slot, then scales and adds it; the next step's
  scales are loaded one step ahead. Its half of the output tile leaves through shared memory and a TMA store,
  which overlaps the next tile.

Gluon is experimental and its API moves between Triton releases: ``available()`` says whether this Triton and this
GPU can build it; ``fp8_gemm`` keeps its Triton kernels for everything else.
"""

from __future__ import annotations

import torch

from . import _launch

_kernel = None
_error: str | None = None


def _build():
    # Triton resolves a kernel's callees and annotations through its module's globals, so the helpers and the
    # Gluon names they use are bound there.
    global gl, fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait, _tile_coords, _producer, _consumer
    global _cta_barrier, _tma_load, _tma_store
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after Triton 3.6
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        # Grouped ordering, the same as fp8_gemm's Triton helper (a Gluon kernel cannot call a @triton.jit one):
        # GROUP_M consecutive tiles walk down M over the same N band (L2 reuse of B).
        group = tile // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % size_m), (tile % (GROUP_M * num_n)) // size_m

    @gluon.jit
    def _producer(
        a_desc, b_desc, a0_ring, a1_ring, b_ring, ready, empty, M, N, KB, num_programs,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
    ):  # fmt: skip
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        HALF: gl.constexpr = BLOCK_M // 2
        g = 0  # K steps loaded so far: slot g % STAGES, round g // STAGES
        for tile in range(gl.program_id(0), num_m * num_n, num_programs):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            for k in range(KB):
                slot = g % STAGES
                # The slot is free once both consumers released it in the previous round (round 0: at once).
                mbarrier.wait(empty.index(slot), ((g // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, (BLOCK_M + BLOCK_N) * BLOCK_K)
                _tma_load(a_desc, [pid_m * BLOCK_M, k * BLOCK_K], bar, a0_ring.index(slot))
                _tma_load(a_desc, [pid_m * BLOCK_M + HALF, k * BLOCK_K], bar, a1_ring.index(slot))
                _tma_load(b_desc, [pid_n * BLOCK_N, k * BLOCK_K], bar, b_ring.index(slot))
                g += 1

    @gluon.jit
    def _consumer(
        c_desc, c_smem, a_ring, b_ring, ready, empty, a_s_ptr, b_s_ptr, M, N, KB, num_programs,
        SB_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
        STAGES: gl.constexpr, H: gl.constexpr,
    ):  # fmt: skip
        # One warpgroup: rows H * BLOCK_M / 2 ... of each tile. Each K step's product is waited for, then scaled
        # and added; the other warpgroup's products keep the tensor cores busy meanwhile.
        HALF: gl.constexpr = BLOCK_M // 2
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
        )
        rows_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        zero = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        g = 0  # K steps consumed so far
        for tile in range(gl.program_id(0), num_m * num_n, num_programs):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            rows = pid_m * BLOCK_M + H * HALF + gl.arange(0, HALF, layout=rows_layout)
            a_s_rows = a_s_ptr + gl.minimum(rows, M - 1) * KB
            b_s_tile = b_s_ptr + (pid_n * BLOCK_N // SB_N) * KB
            acc = zero
            sa = gl.load(a_s_rows)
            sb = gl.load(b_s_tile)
            for k in range(KB):
                slot = g % STAGES
                mbarrier.wait(ready.index(slot), (g // STAGES) & 1)
                p = warpgroup_mma(
                    a_ring.index(slot), b_ring.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True
                )
                scale = sa * sb
                sa = gl.load(a_s_rows + gl.minimum(k + 1, KB - 1))  # the next step's scales, a step ahead
                sb = gl.load(b_s_tile + gl.minimum(k + 1, KB - 1))
                p = warpgroup_mma_wait(0, deps=[p])
                mbarrier.arrive(empty.index(slot), count=1)
                acc += p * scale[:, None]
                g += 1
            tma.store_wait(0)  # the previous tile's store (issued by one thread) has left c_smem ...
            _cta_barrier()  # ... before any thread of this warpgroup overwrites it
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _cta_barrier()  # every thread's part of the tile is in c_smem before the store is issued
            _tma_store(c_desc, [pid_m * BLOCK_M + H * HALF, pid_n * BLOCK_N], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def fp8_gemm_gluon_kernel(
        a_desc,  # [M, K] float8_e4m3fn, block [BLOCK_M / 2, BLOCK_K]
        b_desc,  # [N, K] float8_e4m3fn, block [BLOCK_N, BLOCK_K]
        c_desc,  # [M, N] output, block [BLOCK_M / 2, BLOCK_N]
        a_s_ptr,  # [M, KB] f32 activation scales
        b_s_ptr,  # [ceil(N / SB_N), KB] f32 weight block scales
        M,
        N,
        KB,
        num_programs,  # persistent grid: program p does tiles p, p + num_programs, ...
        SB_N: gl.constexpr,  # weight block height; a multiple of BLOCK_N (one weight scale per tile and K step)
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PDL: gl.constexpr,  # programmatic dependent launch: wait for the previous kernel, let the next one launch
    ):
        HALF: gl.constexpr = BLOCK_M // 2
        a0_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, BLOCK_K], a_desc.layout)
        a1_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, BLOCK_K], a_desc.layout)
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        c0_smem = gl.allocate_shared_memory(c_desc.dtype, [HALF, BLOCK_N], c_desc.layout)
        c1_smem = gl.allocate_shared_memory(c_desc.dtype, [HALF, BLOCK_N], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
        fence_async_shared()
        if PDL:  # the set-up above overlaps the previous kernel's end; no global memory is touched before this
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise(
                "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
            )
        gl.warp_specialize(
            [
                (_consumer, (c_desc, c0_smem, a0_ring, b_ring, ready, empty, a_s_ptr, b_s_ptr, M, N, KB, num_programs,
                             SB_N, BLOCK_M, BLOCK_N, GROUP_M, STAGES, 0)),
                (_consumer, (c_desc, c1_smem, a1_ring, b_ring, ready, empty, a_s_ptr, b_s_ptr, M, N, KB, num_programs,
                             SB_N, BLOCK_M, BLOCK_N, GROUP_M, STAGES, 1)),
                (_producer, (a_desc, b_desc, a0_ring, a1_ring, b_ring, ready, empty, M, N, KB, num_programs, BLOCK_M,
                             BLOCK_N, BLOCK_K, GROUP_M, STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip

    return fp8_gemm_gluon_kernel


def available(device: torch.device) -> bool:
    """This Triton has Gluon's Hopper API and ``device`` is a Hopper GPU (compute capability 9.x). When the API is
    missing, ``build_error()`` says why."""
    global _kernel, _error
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    if _kernel is None and _error is None:
        try:
            _kernel = _build()
        except Exception as e:  # an older or newer Triton without this API: the Triton kernel is used instead
            _error = f"{type(e).__name__}: {e}"
    return _kernel is not None


_LAYOUTS: dict = {}  # (block shape, torch dtype) -> NVMMASharedLayout, kept for the process (_launch.descriptor)


def build_error() -> str | None:
    """Why the kernel could not be built on this Triton (None if it was, or was not tried)."""
    return _error


def _descriptor(ptr: int, dtype: torch.dtype, shape: tuple, row_stride: int, block: tuple[int, int]):
    """A Gluon tensor descriptor over the 2-D tensor at ``ptr`` (unit stride along its rows), built once
    (_launch.descriptor)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    key = (*block, dtype)
    layout = _LAYOUTS.get(key)
    if layout is None:
        gl_dtype = {
            torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32,
            torch.float16: gl.float16,
        }[dtype]  # fmt: skip
        layout = _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)
    return _launch.descriptor(TensorDescriptor, ptr, dtype, shape, (row_stride, 1), block, layout)


def launch(a2, b, c, a_s2, b_s, M, N, K, KB, sb_n, programs, block_m=128, block_n=128, stages=6, group_m=8,
           producer_regs=40, consumer_regs=232, pdl=0, static=None, ptrs=None) -> None:  # fmt: skip
    """Run the kernel on prepared operands (``fp8_gemm`` checks shapes, strides and alignment: 16-byte aligned
    rows and bases, one weight scale per tile and K step). ``pdl``: programmatic dependent launch (Hopper).
    ``ptrs``: the five tensors' ``data_ptr()`` if the caller has them; ``static``: as in ``_launch.launch``."""
    if c.element_size() > 2:  # an f32 output tile takes twice the shared memory: fewer ring slots
        stages = min(stages, 4)
    pa, pb, pc, pas, pbs = ptrs or (a2.data_ptr(), b.data_ptr(), c.data_ptr(), a_s2.data_ptr(), b_s.data_ptr())
    descs = (
        _descriptor(pa, a2.dtype, (M, K), a2.stride(0), (block_m // 2, 128)),
        _descriptor(pb, b.dtype, (N, K), b.stride(0), (block_n, 128)),
        _descriptor(pc, c.dtype, (M, N), N, (block_m // 2, block_n)),
    )
    args = (*descs, a_s2, b_s, M, N, KB, programs)
    const = dict(SB_N=sb_n, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=group_m, STAGES=stages,
                 PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs, PDL=bool(pdl))  # fmt: skip
    addresses = None if static is None else (*descs, pas, pbs, *args[5:])
    _launch.launch(
        _kernel, (programs,), args, const, static, addresses, num_warps=4, **({"launch_pdl": True} if pdl else {})
    )
