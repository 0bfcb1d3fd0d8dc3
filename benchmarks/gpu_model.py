"""Prefill throughput of ``run_model`` on a CUDA GPU, on a synthetic checkpoint with real DeepSeek-V3 layer shapes.

    python benchmarks/gpu_model.py --dir /tmp/dsv3-bench [--layers 3] [--experts 32] [--tokens 4096] [--profile]

The checkpoint is V3's geometry (hidden 7168, 128 heads, MLA ranks 1536/512, dense 18432, experts 2048 wide,
vocab 129280) cut to ``--layers`` layers (the first dense, the rest MoE) and ``--experts`` routed experts (top 8 of
8 groups), FP8 with 128x128 scales, written by ``dsv3_tools.synth``. Tokens/s counts every prompt token; each mode
runs once to warm up (compilation, page cache) and is then timed over ``--repeat`` runs (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.model import load_model, run_model
from dsv3_tools.synth import synth


def make(path: Path, layers: int, experts: int) -> None:
    if (path / "config.json").exists():
        return
    cfg = ModelConfig.load("deepseek-v3")
    cfg = replace(cfg, num_hidden_layers=layers, first_k_dense_replace=1, num_nextn_predict_layers=0)
    t = time.perf_counter()
    synth(path, cfg, dtype="fp8", seed=0, shards=4, experts=experts)
    print(f"synth: {time.perf_counter() - t:.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dsv3-bench")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096, help="total prompt tokens (4 prompts)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile", action="store_true", help="after the timed runs: the GPU kernels of one resident forward"
    )
    args = ap.parse_args()
    path = Path(args.dir)
    make(path, args.layers, args.experts)
    ck = open_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    T = args.tokens // 4
    prompts = [torch.randint(0, ck.config.vocab_size, (T,), generator=g).tolist() for _ in range(4)]
    rows = []
    logits = {}
    for gemm in ("fp8", "bf16"):
        # Resident: read once, then time the forward alone.
        torch.cuda.synchronize()
        t = time.perf_counter()
        model = load_model(ck, device="cuda", engine="triton", gemm=gemm, stream=False, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t
        times = []
        for i in range(args.repeat + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.forward(prompts)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        if args.profile:  # where the resident forward's GPU time goes, by kernel
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.forward(prompts)
                torch.cuda.synchronize()
            print(f"gemm={gemm}: GPU kernels of one resident forward")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        del model
        torch.cuda.empty_cache()
        logits[gemm] = torch.cat(out.logits)
        med = statistics.median(times)
        rows.append(
            dict(
                gemm=gemm,
                mode="resident",
                seconds=med,
                tokens_per_s=args.tokens / med,
                load_s=load_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            )
        )
        torch.cuda.reset_peak_memory_stats()
        # Streamed: every layer read from the checkpoint (page cache) just before it runs, the whole run timed.
        times = []
        for i in range(args.repeat + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = run_model(ck, prompts, device="cuda", engine="triton", gemm=gemm, stream=True, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        same = all(torch.equal(x, y) for x, y in zip(torch.cat(out.logits).split(1), logits[gemm].split(1)))
        med = statistics.median(times)
        rows.append(
            dict(
                gemm=gemm,
                mode="streamed",
                seconds=med,
                tokens_per_s=args.tokens / med,
                load_s=None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                equal_to_resident=same,
            )
        )
        torch.cuda.reset_peak_memory_stats()
        print(rows[-2], rows[-1], flush=True)
    ref, fp8_logits = logits["bf16"], logits["fp8"]
    err = ((fp8_logits - ref).norm() / ref.norm()).item()
    top1 = (fp8_logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"fp8 vs bf16 gemm logits: rel err {err:.3e}, top-1 agreement {top1:.3f}")
    cfg = ck.config
    print(
        f"model: {cfg.num_hidden_layers} layers (1 dense), {cfg.n_routed_experts} experts, {args.tokens} tokens "
        f"in 4 prompts, compute bf16, {torch.cuda.get_device_name()}"
    )
    for r in rows:
        extra = f", load {r['load_s']:.1f} s" if r["load_s"] else f", equal to resident: {r['equal_to_resident']}"
        print(
            f"gemm={r['gemm']:4} {r['mode']:8}: {r['tokens_per_s']:9.0f} tokens/s "
            f"({r['seconds']:.3f} s, peak {r['peak_gib']:.1f} GiB{extra})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, fp8_vs_bf16_rel_err=err, top1=top1), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
