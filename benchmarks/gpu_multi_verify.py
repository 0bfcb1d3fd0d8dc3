"""``verify`` across several GPUs (NCCL) on MP-N shards, against the single-GPU streamed run (issue 8).

    python benchmarks/gpu_multi_verify.py --nproc 2 [--dir /tmp/dsv3-multi] [--layers 4] [--experts 16]
    python benchmarks/gpu_multi_verify.py --nproc 2 --device cpu --config tiny     # a gloo smoke run, no GPU

Steps, all in one run:
1. a synthetic FP8 checkpoint with DeepSeek-V3's real layer shapes (``synth``; reduced depth and experts);
2. ``shard --mp N``;
3. single process, streamed: ``verify CKPT --save-reference REF`` (the reference; its wall time and peak GPU memory);
4. ``torchrun --nproc-per-node N`` running ``verify MP-N --reference REF`` through this script's ``--worker`` mode:
   NCCL all-reduces change float summation order, so the expected verdict is the ``float`` tier, not bit equality;
   each rank records its wall time, prefill tokens/s and peak GPU memory;
5. the same check through the CLI itself, ``torchrun --nproc-per-node N -m dsv3_tools verify MP-N --reference REF``
   (its exit status is the verdict).
Prints a table; writes ``$OUT/gpu_multi_verify.json`` when ``OUT`` is set.

NVLink multicast stays off (required on the shared multi-GPU hosts): NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set for every process this script starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _peak_gpu_bytes() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: verify the MP-N folder against the reference; rank files report time and memory."""
    import torch

    from dsv3_tools.runtime import init_distributed
    from dsv3_tools.verify import verify_checkpoint

    rank, world = init_distributed(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = verify_checkpoint(
        args.mp_dir, reference=args.ref, device=args.device, engine=args.engine, stream=True, dtype=args.dtype
    )
    dt = time.perf_counter() - t0
    tokens = sum(p.tokens for p in rep.prompts)  # every rank runs every prompt
    out = {
        "rank": rank,
        "world": world,
        "seconds": dt,
        "peak_gpu_bytes": _peak_gpu_bytes(),
        "verdict": rep.verdict,
        "tier": rep.tier,
        "tokens": tokens,
        "overall": rep.as_dict().get("overall"),
        "failures": rep.failures,
    }
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(out, indent=2, default=str))


def _run(cmd: list[str], env: dict) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3-multi"))
    ap.add_argument("--config", default="deepseek-v3")
    ap.add_argument("--layers", type=int, default=4, help="main layers (V3: 3 dense, then MoE)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engine", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mp-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.engine = args.engine or ("triton" if args.device == "cuda" else "torch")
    if args.worker:
        worker(args)
        return

    env = {**os.environ, **NO_MULTICAST}
    os.environ.update(NO_MULTICAST)
    from dsv3_tools.shard import shard_checkpoint
    from dsv3_tools.synth import synth

    d = args.dir
    ck, mp, ref, res = d / "ckpt", d / f"mp{args.nproc}", d / "ref.safetensors", d / "results"
    for p in (mp, ref, res):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    res.mkdir(parents=True)
    if not (ck / "config.json").is_file():
        shutil.rmtree(ck, ignore_errors=True)
        t = time.perf_counter()
        synth(ck, args.config, dtype="fp8", layers=args.layers, experts=args.experts, mtp=0, shards=4)
        print(f"synth: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    shard_checkpoint(ck, mp, mp=args.nproc, mtp="drop")
    print(f"shard --mp {args.nproc}: {time.perf_counter() - t:.1f} s", flush=True)

    cli = [sys.executable, "-m", "dsv3_tools", "verify"]
    common = ["--device", args.device, "--engine", args.engine, "--dtype", args.dtype, "--stream"]
    single = _run([*cli, str(ck), "--save-reference", str(ref), *common, "--json"], env)
    multi = _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            __file__, "--worker", "--mp-dir", str(mp), "--ref", str(ref), "--result-dir", str(res),
            "--device", args.device, "--engine", args.engine, "--dtype", args.dtype,
        ],
        env,
    )  # fmt: skip
    cli_rc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "dsv3_tools", "verify", str(mp), "--reference", str(ref), *common,
        ],
        env=env,
    ).returncode  # fmt: skip
    print(f"torchrun ... -m dsv3_tools verify: exit {cli_rc}", flush=True)
    ranks = [json.loads((res / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    r0 = ranks[0]
    summary = {
        "config": args.config,
        "layers": args.layers,
        "experts": args.experts,
        "nproc": args.nproc,
        "device": args.device,
        "single_process_save_reference_s": single,
        "torchrun_total_s": multi,
        "cli_torchrun_exit": cli_rc,
        "ranks": ranks,
        "verdict": r0["verdict"],
        "tier": r0["tier"],
        "tokens_per_s_rank0": (r0["tokens"] / r0["seconds"]) if r0["seconds"] and r0["tokens"] else None,
    }
    print(f"\n{'rank':>4} {'verdict':>8} {'tier':>9} {'seconds':>8} {'peak GPU GB':>12}")
    for r in ranks:
        print(
            f"{r['rank']:>4} {r['verdict']:>8} {str(r['tier']):>9} {r['seconds']:8.1f} {r['peak_gpu_bytes'] / 1e9:12.2f}"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}, indent=2, default=str))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_multi_verify.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    sys.exit(0 if r0["verdict"] == "pass" and cli_rc == 0 else 1)


if __name__ == "__main__":
    main()
