"""The upstream demo's ``generate.py``, unchanged, on ``shard`` output (GPU; the demo's FP8 kernels need Hopper).

A synthetic FP8 checkpoint of real V3 shapes (depth and experts reduced) is sharded with ``--mp 1`` (and ``--mp N``
for N GPUs when ``--mp`` says so), then the demo runs in batch mode, greedy, exactly as its README says to run it:

    torchrun --nproc-per-node N generate.py --ckpt-path DST --config DST/model_args.json --input-file prompts.txt

from a copy of its ``inference/`` folder (``--upstream DIR``; carried to the GPU machine, never into the repository).
The script prints the command, its exit code, its output (the completions are noise: random weights), and a JSON
line with the figures, and fails if the demo fails.

    python benchmarks/gpu_upstream_generate.py --upstream ../shared/upstream/deepseek-v3/inference --workdir /tmp/up
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

from dsv3_tools.shard import shard_checkpoint
from dsv3_tools.synth import synth

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "def fib(n):"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="the demo's inference/ folder")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/upstream-generate"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--mp", type=int, nargs="+", default=[1])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    src = args.workdir / "v3-fp8"
    t = time.perf_counter()
    synth(src, "deepseek-v3", dtype="fp8", layers=args.layers, experts=args.experts, shards=4)
    print(f"synth: {time.perf_counter() - t:.1f} s", flush=True)
    prompts = args.workdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    demo = args.workdir / "inference"
    shutil.copytree(args.upstream, demo)  # run it from its own folder, as its README says
    results = []
    for mp in args.mp:
        dst = args.workdir / f"mp{mp}"
        shard_checkpoint(src, dst, mp=mp)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(mp), "generate.py",
            "--ckpt-path", str(dst), "--config", str(dst / "model_args.json"), "--input-file", str(prompts),
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0",
        ]  # fmt: skip
        print("$ " + " ".join(cmd[3:]), flush=True)
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=demo, capture_output=True, text=True, env=dict(os.environ))
        dt = time.perf_counter() - t
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n", flush=True)
        results.append(
            {"mp": mp, "exit": r.returncode, "seconds": round(dt, 1), "completions": r.stdout.count("Completion")}
        )
    print(json.dumps({"layers": args.layers, "experts": args.experts, "results": results}), flush=True)
    if any(x["exit"] != 0 for x in results):
        raise SystemExit("the upstream demo failed on shard output")


if __name__ == "__main__":
    main()
