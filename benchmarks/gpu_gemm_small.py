# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""``fp8_gemm`` at small M (decode and short prefill) on a CUDA GPU (H200), against cuBLAS bf16, four ways:

- ``do_bench``: Triton's timing (median; the L2 is emptied before each call), the method of the issue's anchor. It
  includes whatever part of the host's launch path the L2 flush does not hide;
- ``cold``: the kernels' own GPU time with a cold L2, from the CUDA profiler (CUPTI): the flush runs before each call,
  and only the product's kernels are summed, so a slow host does not show;
- ``graph``: CUDA-graph replay, back to back (the L2 keeps what the last call left);
- ``host``: microseconds of host time per call (the GPU is held busy first, so the calls only queue).

Each schedule is checked against ``fp8_gemm_ref`` first. Then a profile of the host side of one call.

    python benchmarks/gpu_gemm_small.py [--json out.json] [--shapes 0,1]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import torch
import triton
from gpu_gemm_tune import operands  # this script's folder is on sys.path when run

from dsv3_tools.kernels.act_quant import act_quant
from dsv3_tools.kernels.fp8_gemm import GemmConfig, fp8_gemm, pick_config
from dsv3_tools.kernels.weight_quant import weight_quant_ref

SHAPES = [(128, 7168, 2048), (16, 18432, 7168), (128, 2048, 7168), (128, 18432, 7168), (256, 7168, 2048),
          (512, 2048, 7168), (64, 7168, 2048), (16, 2048, 7168), (128, 576, 7168), (16, 576, 7168),
          (128, 1536, 7168), (64, 2048, 7168), (32, 576, 7168), (256, 2048, 7168)]  # fmt: skip
C = GemmConfig


def candidates(M: int, N: int, K: int, wide: bool = False) -> list[GemmConfig]:
    """pick_config's choice, with and without dependent launch, the pointer and TMA kernels unsplit and split, the
    Gluon kernel's 128 x 64 tiles from M = 65; ``wide``: more tiles and splits."""
    ptr = C(16, 64, 4, 6) if M <= 16 else C(64, 128, 4, 4)
    pick = pick_config(M, N, K)
    out = [pick, ptr, C(64, 128, 4, 4, 1)]
    out += [ptr._replace(split_k=s) for s in (2, 3)]
    out += [C(64, 128, 4, 4, 1, split_k=s) for s in (2, 3, 4)]
    out.append(pick._replace(pdl=0 if pick.pdl else 2))  # programmatic dependent launch, on or off
    if M > 64:  # the warp-specialized Gluon kernel with 128 x 64 tiles (the fastest at M = 128 by kernel time)
        out.append(C(128, 64, 4, 6, 1, persistent=1, gluon=1, pdl=1))
    if wide:
        out += [ptr._replace(split_k=s) for s in (4, 6, 8)]
        out += [C(64, 128, 4, 4, 1, split_k=s) for s in (6, 8)]
        out += [C(64, 64, 4, 5, int(M > 16), split_k=s) for s in (1, 4, 6, 8)]
    return list(dict.fromkeys(out))


_FLUSH = None


def cold_us(fn, reps: int = 40) -> float:
    """Mean GPU time of fn's kernels per call, each call after an L2 flush, from the profiler's kernel records."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            _FLUSH.zero_()
            fn()
        torch.cuda.synchronize()
    flush_names = ("fill", "Fill", "zero", "Zero", "memset", "Memset")
    total, n = 0.0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not any(f in e.name for f in flush_names):
            total += e.time_range.elapsed_us()
            n += 1
    if n < reps:
        raise RuntimeError(f"the profiler saw {n} kernels in {reps} calls")
    return total / reps


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call, with the GPU held busy so that no call waits for it."""
    fn()  # a first call may compile (or load) its kernel
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9 * 0.2))  # ~0.2 s of GPU time: longer than the calls take to queue
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return dt * 1e6


def measure(fn, flops: int) -> dict:
    t_bench = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    t_graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return dict(
        do_bench=flops / t_bench / 1e9,
        cold=flops / cold_us(fn) / 1e6,
        graph=flops / t_graph / 1e9,
        host_us=host_us(fn),
    )


def fmt(r: dict) -> str:
    return (
        f"do_bench {r['do_bench']:6.1f} | cold {r['cold']:6.1f} | graph {r['graph']:6.1f} | host {r['host_us']:5.1f} us"
    )


def run_shape(M: int, N: int, K: int, out: dict, wide: bool = False, pick_only: bool = False) -> None:
    a, w, q, ws, aq, as_, want = operands(M, N, K)
    flops = 2 * M * N * K
    abf, wbf = a.bfloat16(), w.bfloat16()
    base = measure(lambda: abf @ wbf.T, flops)
    print(f"M={M} N={N} K={K}  cuBLAS bf16        {fmt(base)}", flush=True)
    out.setdefault("rows", []).append(dict(M=M, N=N, K=K, config="cublas_bf16", **base))
    for cfg in [None] if pick_only else [None, *candidates(M, N, K, wide)]:
        name = "pick" if cfg is None else str(tuple(v for v in cfg))
        try:
            got = fp8_gemm(aq, as_, q, ws, torch.float32, config=cfg)
            err = ((got - want).norm() / want.norm()).item()
            if not err < 1e-3:
                raise AssertionError(f"relative error {err:.2e}")
            r = measure(lambda: fp8_gemm(aq, as_, q, ws, config=cfg), flops)
        except Exception as e:  # a schedule the compiler rejects, or a wrong result: record it, go on
            print(f"  {name}: {type(e).__name__}: {str(e)[-300:]}", flush=True)
            out.setdefault("errors", []).append([M, N, K, name, f"{type(e).__name__}: {str(e)[-600:]}"])
            continue
        print(f"  {name:58s} {fmt(r)}  x{r['cold'] / base['cold']:.2f} cold", flush=True)
        out["rows"].append(dict(M=M, N=N, K=K, config=name, err=err, **r))


def profile_host(out: dict) -> None:
    """Where one call's host time goes (cProfile, 2000 calls at M = 128)."""
    M, N, K = SHAPES[0]
    aq, as_ = act_quant(torch.randn(M, K, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(N, K, device="cuda"))
    abf, wbf = aq.bfloat16(), q.bfloat16()
    fp8_gemm(aq, as_, q, ws)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fp8_gemm(aq, as_, q, ws)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue())
    out["host_profile"] = s.getvalue()
    for what, fn in [
        ("torch.empty", lambda: torch.empty((M, N), dtype=torch.bfloat16, device="cuda")),
        ("fp8_gemm (pick)", lambda: fp8_gemm(aq, as_, q, ws)),
        ("cuBLAS bf16", lambda: abf @ wbf.T),
        ("act_quant (the GEMM's input, bf16 in)", lambda: act_quant(abf)),
    ]:
        print(f"host {what}: {host_us(fn):.1f} us", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--wide", action="store_true", help="more schedules per shape (the split-K sweep)")
    p.add_argument("--pick-only", action="store_true", help="only pick_config's schedule against cuBLAS")
    args = p.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    from dsv3_tools.kernels import _launch

    print(out, flush=True)
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for M, N, K in shapes:
        run_shape(M, N, K, out, args.wide, args.pick_only)
    out["short_launch_path"] = _launch.disabled_reason() or "in use"
    print("short launch path:", out["short_launch_path"], flush=True)
    if not args.no_profile:
        profile_host(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
