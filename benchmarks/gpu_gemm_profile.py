"""One profiled launch per shape of ``fp8_gemm`` (and, for comparison, torch's block-scaled ``_scaled_mm``), for
Nsight Compute. Each kernel is compiled and warmed up first; only the launches between ``cudaProfilerStart`` and
``cudaProfilerStop`` are profiled.

    ncu --profile-from-start off --clock-control none --set full -o gemm python benchmarks/gpu_gemm_profile.py
    ncu -i gemm.ncu-rep --page details > gemm.txt

``--shapes 1,2`` picks rows of ``gpu_gemm_tune.SHAPES``; ``--no-cublas`` leaves torch's kernel out; ``--config``
names a schedule of ``kernels/fp8_gemm.py`` (``WS_128``, ``SHORT_K``, ``LONG_K``, or a ``GemmConfig(...)``) instead
of ``pick_config``'s.
"""

from __future__ import annotations

import argparse

import torch
from gpu_gemm_tune import SHAPES  # the four shapes (this script's folder is on sys.path when run)

from dsv3_tools.kernels import fp8_gemm as fg
from dsv3_tools.kernels.act_quant import act_quant
from dsv3_tools.kernels.fp8_gemm import fp8_gemm
from dsv3_tools.kernels.weight_quant import weight_quant_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--no-cublas", action="store_true")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    cfg = (
        eval(args.config, {n: getattr(fg, n) for n in ("GemmConfig", "WS_128", "SHORT_K", "LONG_K")})
        if args.config
        else None
    )
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    runs = []
    for M, N, K in shapes:
        g = torch.Generator(device="cuda").manual_seed(M + N + K)
        aq, as_ = act_quant(torch.randn(M, K, device="cuda", generator=g))
        q, ws = weight_quant_ref(torch.randn(N, K, device="cuda", generator=g))
        runs.append((f"fp8_gemm {M}x{N}x{K}", lambda aq=aq, as_=as_, q=q, ws=ws: fp8_gemm(aq, as_, q, ws, config=cfg)))
        if not args.no_cublas:
            sa = as_.T.contiguous().T  # outer-dim-major activation scales, as cuBLAS wants them
            runs.append(
                (
                    f"_scaled_mm {M}x{N}x{K}",
                    lambda aq=aq, sa=sa, q=q, ws=ws: torch._scaled_mm(aq, q.T, sa, ws.T, out_dtype=torch.bfloat16),
                )
            )
    for _, fn in runs:  # compile, autotune and warm up outside the profiled range
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in runs:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(n for n, _ in runs))


if __name__ == "__main__":
    main()
