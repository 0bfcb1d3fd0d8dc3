# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""Tunes ``fp8_gemm`` at M = 4096 on a CUDA GPU (H200): a list of ``GemmConfig`` schedules per shape, each
checked against ``fp8_gemm_ref`` before it is timed, then all timed in rotating order over several rounds (median).

Run on the GPU machine from the repository root, after ``pip install --no-deps --no-build-isolation -e .``:

    python benchmarks/gpu_gemm_tune.py [--json out.json] [--shapes 0,2] [--m 1024]

Figures are TFLOP/s (2 M N K per product), median of ``triton.testing.do_bench`` (the chosen schedule also by
CUDA-graph replay, which leaves out the host's launch cost), with cuBLAS bf16 and torch's
FP8 ``_scaled_mm`` timed in the same run on the same data: block-scaled like ours (cuBLAS; its error against
``fp8_gemm_ref`` is recorded too), and with one scale per row and column (no per-block promotion: a ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from dsv3_tools.kernels.act_quant import act_quant
from dsv3_tools.kernels.fp8_gemm import LONG_K, SHORT_K, WS_128, GemmConfig, fp8_gemm, fp8_gemm_ref, pick_config
from dsv3_tools.kernels.weight_quant import weight_quant_ref

SHAPES = [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 24576, 1536), (4096, 7168, 16384)]
C = GemmConfig
# The chosen schedule (WS_128, on Hopper), its two Triton fallbacks, the runners-up of the tuning runs recorded in
# docs/benchmarks.md, and the default before the fallbacks (the "old" column).
CANDIDATES = [
    SHORT_K,
    LONG_K,
    WS_128,
    WS_128._replace(group_m=16),
    WS_128._replace(stages=5),
    C(64, 128, 4, 3, 1),  # the previous default (K < 4096)
    C(64, 128, 4, 4, 1),  # the previous default (K >= 4096)
]
ROUNDS = 3


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def operands(M: int, N: int, K: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """Random normal activations a [M, K] and weights w [N, K] (seeded by the shape), their FP8 forms (q, ws: the
    weights; aq, as_: the activations) and the f32 reference product of the quantized operands."""
    g = torch.Generator(device=device).manual_seed(M + N + K)
    a = torch.randn(M, K, device=device, generator=g)
    w = torch.randn(N, K, device=device, generator=g)
    q, ws = weight_quant_ref(w)
    aq, as_ = act_quant(a)
    return a, w, q, ws, aq, as_, fp8_gemm_ref(aq, as_, q, ws, torch.float32)


def tune(M: int, N: int, K: int, out: dict) -> str:
    a, w, q, ws, aq, as_, want = operands(M, N, K)
    flops = 2 * M * N * K
    seen: dict[GemmConfig, float] = {}

    def measure(cfg: GemmConfig) -> float:
        if cfg in seen:
            return seen[cfg]
        try:
            got = fp8_gemm(aq, as_, q, ws, torch.bfloat16, config=cfg).float()
            err = ((got - want).norm() / want.norm()).item()
            if not err < 5e-3:  # bf16 rounding of the output is ~2e-3; a wrong tile is O(1)
                raise AssertionError(f"relative error {err:.2e}")
            tf = flops / bench(lambda: fp8_gemm(aq, as_, q, ws, config=cfg)) / 1e9
        except Exception as e:  # a configuration the compiler rejects, or a wrong result: record it, go on
            out.setdefault("errors", []).append([M, N, K, list(cfg), f"{type(e).__name__}: {str(e)[-600:]}"])
            tf = 0.0
        seen[cfg] = tf
        out.setdefault("sweep", []).append([M, N, K, list(cfg), round(tf, 1)])
        return tf

    for cfg in CANDIDATES:  # compile and check each once, then time them all in rotating order, ROUNDS times
        measure(cfg)
    ok = [c for c in CANDIDATES if seen[c] > 0]
    times: dict[GemmConfig, list[float]] = {c: [] for c in ok}
    for r in range(ROUNDS):
        for c in ok[r:] + ok[:r]:
            times[c].append(flops / bench(lambda c=c: fp8_gemm(aq, as_, q, ws, config=c)) / 1e9)
    med = {c: sorted(v)[len(v) // 2] for c, v in times.items()}
    for c in ok:
        out.setdefault("rounds", []).append([M, N, K, list(c), [round(x, 1) for x in times[c]], round(med[c], 1)])
    for c in sorted(ok, key=lambda c: -med[c]):
        print(f"   {M} {N} {K} {med[c]:7.1f}  {c}", flush=True)
    if not med:
        return f"{M:>5} {N:>6} {K:>6} | every configuration failed (see errors)"
    best = max(med, key=med.get)
    pick = pick_config(M, N, K)
    old = GemmConfig(64, 128, 4, 4 if K >= 4096 else 3, 1)
    t_best, t_pick, t_old = med[best], med.get(pick, 0.0), med.get(old, 0.0)
    abf, wbf = a.bfloat16(), w.bfloat16()
    t_bf16 = flops / bench(lambda: abf @ wbf.T) / 1e9
    # The kernel alone: CUDA-graph replay leaves out the host's launch cost (about 40-120 us per call on these
    # machines), which do_bench only hides behind its L2 flush when the host is quick enough.
    t_graph = (
        flops / triton.testing.do_bench_cudagraph(lambda: fp8_gemm(aq, as_, q, ws), rep=80, return_mode="median") / 1e9
    )
    row = dict(M=M, N=N, K=K, pick=list(pick), pick_tflops=t_pick, best=list(best), best_tflops=t_best, old=list(old))
    row.update(old_tflops=t_old, bf16=t_bf16, pick_graph_tflops=t_graph)
    try:  # FP8 tensor cores with one scale per row / column: what the chip gives without per-block rescaling
        sa = torch.ones(M, 1, device="cuda")
        sb = torch.ones(1, N, device="cuda")
        row["scaled_mm_rowwise"] = (
            flops / bench(lambda: torch._scaled_mm(aq, q.T, sa, sb, out_dtype=torch.bfloat16)) / 1e9
        )
    except Exception as e:
        row["scaled_mm_rowwise"] = f"{type(e).__name__}: {str(e)[:120]}"
    try:  # torch's block-scaled FP8 (1x128 activations, 128x128 weights), where this torch/cuBLAS has it
        sa_t = as_.T.contiguous().T  # outer-dim-major activation scales
        got = torch._scaled_mm(aq, q.T, sa_t, ws.T, out_dtype=torch.bfloat16)
        row["scaled_mm_blockwise_err"] = ((got.float() - want).norm() / want.norm()).item()
        row["scaled_mm_blockwise"] = (
            flops / bench(lambda: torch._scaled_mm(aq, q.T, sa_t, ws.T, out_dtype=torch.bfloat16)) / 1e9
        )
    except Exception as e:
        row["scaled_mm_blockwise"] = f"{type(e).__name__}: {str(e)[:120]}"
    out.setdefault("rows", []).append(row)
    torch.cuda.empty_cache()
    return (
        f"{M:>5} {N:>6} {K:>6} | pick {t_pick:6.1f} (graph {t_graph:6.1f}) | best {t_best:6.1f} {tuple(best)} | old {t_old:6.1f} | bf16 {t_bf16:6.1f} | "
        f"scaled_mm rowwise {row['scaled_mm_rowwise'] if isinstance(row['scaled_mm_rowwise'], str) else round(row['scaled_mm_rowwise'])} "
        f"blockwise {row['scaled_mm_blockwise'] if isinstance(row['scaled_mm_blockwise'], str) else round(row['scaled_mm_blockwise'])}"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
    ap.add_argument("--m", type=int, default=None, help="another M for the same (N, K) shapes")
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    shapes = [(args.m or M, N, K) for M, N, K in shapes]
    lines = []
    for s in shapes:
        lines.append(tune(*s, out))
        print(lines[-1], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    for e in out.get("errors", [])[:20]:
        print("error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
