# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""Checks and times the FP8 kernels on a CUDA GPU (H200): fp8_gemm vs cuBLAS bf16, weight_dequant, act_quant.

Run on the GPU machine from the repository root, after ``pip install --no-deps --no-build-isolation -e .``:

    python benchmarks/gpu_kernels.py [--quick] [--json out.json]

Every figure is measured in the same run as its floor (cuBLAS bf16 for the GEMM, a device-to-device copy for the
memory-bound kernels), median of ``triton.testing.do_bench``. Correctness is checked first on fresh random data:
act_quant and weight_dequant bit-exact against their torch references, fp8_gemm against an f32 reference.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref
from dsv3_tools.kernels.fp8_gemm import CONFIGS, fp8_gemm, fp8_gemm_ref, pick_config
from dsv3_tools.kernels.weight_dequant import weight_dequant, weight_dequant_ref
from dsv3_tools.kernels.weight_quant import weight_quant_ref

GEMM_SHAPES = [
    (4096, 7168, 2048),
    (4096, 2048, 7168),
    (4096, 24576, 1536),
    (4096, 7168, 16384),
    (128, 7168, 2048),
    (16, 18432, 7168),
]
DEQUANT_SHAPES = [(18432, 7168), (576, 7168), (7168, 16384), (24576, 1536), (32768, 512)]
DEQUANT_TILES = [
    (16, 1024, 4),
    (32, 512, 4),
    (32, 512, 8),
    (16, 512, 4),
    (8, 1024, 4),
    (32, 1024, 8),
    (16, 2048, 8),
    (64, 256, 4),
    (8, 2048, 8),
    (4, 2048, 4),
]


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_exact(out: dict) -> bool:
    ok = True
    g = torch.Generator(device="cuda").manual_seed(1)
    for M, K in [(33, 300), (4096, 7168), (5, 128), (7, 1536)]:
        x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.float32) * 5
        x[0, :128] = 0  # an all-zero group: the 1e-4 floor
        for fmt in (None, "ue8m0"):
            for dt in (torch.float32, torch.bfloat16):
                y, s = act_quant(x.to(dt), 128, fmt)
                yr, sr = act_quant_ref(x.to(dt), 128, fmt)
                same = torch.equal(s, sr) and torch.equal(y.view(torch.uint8), yr.view(torch.uint8))
                ok &= same
                out.setdefault("act_quant_exact", []).append([M, K, fmt, str(dt), same])
    for M, N in DEQUANT_SHAPES + [(200, 300), (129, 1)]:
        w = torch.randn(M, N, device="cuda", generator=g) * 0.02
        w[:128, :128] = 0
        q, s = weight_quant_ref(w)
        y = weight_dequant(q, s)
        same = torch.equal(y.view(torch.int16), weight_dequant_ref(q, s).view(torch.int16))
        ok &= same
        out.setdefault("weight_dequant_exact", []).append([M, N, same])
    return ok


def gemm_rows(quick: bool, out: dict) -> list[str]:
    lines = []
    g = torch.Generator(device="cuda").manual_seed(2)
    for M, N, K in GEMM_SHAPES:
        a = torch.randn(M, K, device="cuda", generator=g)
        w = torch.randn(N, K, device="cuda", generator=g)
        ref = a @ w.T  # f32 reference of the unquantized product
        q, ws = weight_quant_ref(w)
        aq, as_ = act_quant(a)
        abf, wbf = a.bfloat16(), w.bfloat16()
        flops = 2 * M * N * K
        t_bf16 = bench(lambda: abf @ wbf.T)
        kern_err = rel(fp8_gemm(aq, as_, q, ws, torch.float32), fp8_gemm_ref(aq, as_, q, ws, torch.float32))
        err = rel(fp8_gemm(aq, as_, q, ws), ref)
        err_bf16 = rel(abf @ wbf.T, ref)
        best = None
        for cfg in [pick_config(M, N, K)] if quick else CONFIGS:
            if cfg[0] > 2 * max(M, 16):
                continue
            try:
                t = bench(lambda cfg=cfg: fp8_gemm(aq, as_, q, ws, config=cfg))
            except Exception as e:  # a config the compiler rejects (shared memory): skip it, say so
                out.setdefault("gemm_config_errors", []).append([M, N, K, cfg, type(e).__name__])
                continue
            out.setdefault("gemm_sweep", []).append([M, N, K, list(cfg), flops / t / 1e9])
            if best is None or t < best[1]:
                best = (cfg, t)
        t_pick = bench(lambda: fp8_gemm(aq, as_, q, ws))
        t_full = bench(lambda: fp8_gemm(*act_quant(abf), q, ws))
        # The kernels alone: CUDA-graph replay leaves out the host's launch path, which do_bench's timing includes
        # whenever it outlasts the L2 flush before each timed call (small M; slow hosts).
        t_graph = triton.testing.do_bench_cudagraph(lambda: fp8_gemm(aq, as_, q, ws), rep=100, return_mode="median")
        t_bf16_graph = triton.testing.do_bench_cudagraph(lambda: abf @ wbf.T, rep=100, return_mode="median")
        row = dict(
            M=M,
            N=N,
            K=K,
            tflops_pick=flops / t_pick / 1e9,
            tflops_pick_graph=flops / t_graph / 1e9,
            tflops_cublas_bf16_graph=flops / t_bf16_graph / 1e9,
            pick=list(pick_config(M, N, K)),
            tflops_best=flops / best[1] / 1e9,
            best=list(best[0]),
            tflops_with_act_quant=flops / t_full / 1e9,
            tflops_cublas_bf16=flops / t_bf16 / 1e9,
            rel_err_vs_f32=err,
            rel_err_bf16_vs_f32=err_bf16,
            rel_err_vs_ref=kern_err,
        )
        out.setdefault("gemm", []).append(row)
        lines.append(
            f"{M:>5} {N:>6} {K:>6} | fp8 {row['tflops_pick']:7.1f} (best {row['tflops_best']:7.1f} {row['best']}) "
            f"+aq {row['tflops_with_act_quant']:7.1f} | bf16 {row['tflops_cublas_bf16']:7.1f} | graph replay: fp8 "
            f"{row['tflops_pick_graph']:7.1f} bf16 {row['tflops_cublas_bf16_graph']:7.1f} | "
            f"err {err:.2e} (bf16 {err_bf16:.1e}, vs ref {kern_err:.1e})"
        )
        torch.cuda.empty_cache()
    return lines


def bandwidth_rows(quick: bool, out: dict) -> list[str]:
    lines = []
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    copy_tbs = 2 * src.numel() / t / 1e9
    out["copy_TBps"] = copy_tbs
    lines.append(f"device copy (1 GiB, read + write): {copy_tbs:.2f} TB/s")
    g = torch.Generator(device="cuda").manual_seed(3)
    for M, N in DEQUANT_SHAPES:
        w = torch.randn(M, N, device="cuda", generator=g) * 0.02
        q, s = weight_quant_ref(w)
        nbytes = 3 * M * N  # 1 byte read + 2 written per element (scales are negligible)
        res = {}
        for tile in [None] if quick else DEQUANT_TILES:
            tt = bench(lambda tile=tile: weight_dequant(q, s, tile=tile))
            res[str(tile)] = nbytes / tt / 1e9
        t_def = bench(lambda: weight_dequant(q, s))
        # Replayed as a CUDA graph: the kernel alone, without the Python launch path between calls (which
        # dominates for small tensors).
        t_graph = triton.testing.do_bench_cudagraph(lambda: weight_dequant(q, s), rep=100, return_mode="median")
        t_ref = bench(lambda: weight_dequant_ref(q, s))
        row = dict(
            M=M,
            N=N,
            TBps=nbytes / t_def / 1e9,
            graph_TBps=nbytes / t_graph / 1e9,
            by_tile=res,
            torch_ref_TBps=nbytes / t_ref / 1e9,
        )
        out.setdefault("weight_dequant", []).append(row)
        best = max(res.items(), key=lambda kv: kv[1])
        lines.append(
            f"weight_dequant {M}x{N}: {row['TBps']:.2f} TB/s, graph replay {row['graph_TBps']:.2f} (best tile {best[0]} {best[1]:.2f}; torch ref {row['torch_ref_TBps']:.2f})"
        )
    for M, K in [(4096, 7168), (16384, 7168)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t = bench(lambda: act_quant(x))
        nbytes = M * K * 3 + M * (K // 128) * 4
        out.setdefault("act_quant", []).append(dict(M=M, K=K, TBps=nbytes / t / 1e9))
        lines.append(f"act_quant bf16 {M}x{K}: {nbytes / t / 1e9:.2f} TB/s")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="time only the chosen configurations")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    ok = check_exact(out)
    print(f"exactness (act_quant, weight_dequant bit-identical to the torch references): {'OK' if ok else 'FAILED'}")
    lines = bandwidth_rows(args.quick, out) + gemm_rows(args.quick, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(out["device"], "torch", out["torch"], "triton", out["triton"])
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
