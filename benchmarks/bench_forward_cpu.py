"""``model.forward`` on the CPU: median wall time per call for a few prompt shapes (the eager path: prefill
attention, the routed experts sorted by expert).

    python benchmarks/bench_forward_cpu.py --workdir /tmp/bfwd [--config tiny] [--shapes 1x64 4x256]

To compare two commits, run it from each tree with ``PYTHONPATH`` set to that tree (the script prints which
``model.py`` it imported), alternating, several rounds: single runs on a shared 2-core VM spread by about 20%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dsv3_tools.model as model_module
from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.model import load_model
from dsv3_tools.synth import synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-forward-cpu"))
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--shapes", nargs="+", default=["1x64", "4x256"], help="BATCHxTOKENS")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.workdir / args.config
    if not (ckpt / "config.json").is_file():
        synth(ckpt, args.config, dtype="fp8", seed=0)
    ck = open_checkpoint(ckpt)
    model = load_model(ck, device="cpu", engine="torch", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    out = {"model_py": model_module.__file__, "torch": torch.__version__, "ms": {}}
    for shape in args.shapes:
        B, T = (int(v) for v in shape.split("x"))
        prompts = [torch.randint(0, ck.config.vocab_size, (T,), generator=g).tolist() for _ in range(B)]
        model.forward(prompts)  # warm-up
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            model.forward(prompts)
            times.append(time.perf_counter() - t)
        out["ms"][shape] = round(1e3 * statistics.median(times), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
