"""The upstream demo's ``generate.py``, unchanged, on ``shard`` output (GPU; the demo's FP8 kernels need Hopper).

A synthetic FP8 checkpoint of real V3 shapes (depth and experts reduced) is sharded with ``--mp 1`` (and ``--mp N``
for N GPUs when ``--mp`` says so), then the demo runs in batch mode, greedy, exactly as its README says to run it:

    torchrun --nproc-per-node N generate.py --ckpt-path DST --config DST/model_args.json --input-file prompts.txt

from a copy of its ``inference/`` folder (``--upstream DIR``; carried to the GPU machine, never into the repository).
The script prints the command, its exit code, its output (the completions are noise: random weights), and a JSON
line with the figures, and fails if the demo fails. Under transformers 5 the demo fails on any checkpoint at its
chat-template call (see ``COMPAT_LAUNCHER``); the script then runs it once more with that one call restored to
transformers 4's return type, and reports both runs.

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

# transformers 5 changed ``apply_chat_template(..., tokenize=True)`` to return a BatchEncoding (a dict) where 4.x
# returned a list of ids; the demo's generate.py indexes the result as a list, so under transformers 5 it fails on
# every checkpoint (the real DeepSeek-V3 included) at ``torch.tensor(t)``, after the tokenizer and the chat template
# have loaded. When the unchanged run fails that way, the demo runs again through this launcher, which restores the
# 4.x return type (``return_dict=False``, an argument both versions take) and then runs generate.py itself,
# unchanged.
COMPAT_LAUNCHER = """\
import os, runpy, sys
from transformers import tokenization_utils_base as tub
_orig = tub.PreTrainedTokenizerBase.apply_chat_template
def apply_chat_template(self, conversation, *args, **kwargs):
    kwargs.setdefault("return_dict", False)
    return _orig(self, conversation, *args, **kwargs)
tub.PreTrainedTokenizerBase.apply_chat_template = apply_chat_template
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TF5_SIGNATURE = "cannot be interpreted as an integer"  # torch.tensor(BatchEncoding) in generate.py's generate()


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
    launcher = args.workdir / "tf4_chat_template_launcher.py"
    launcher.write_text(COMPAT_LAUNCHER)
    results = []
    for mp in args.mp:
        dst = args.workdir / f"mp{mp}"
        shard_checkpoint(src, dst, mp=mp)
        demo_args = [
            "generate.py", "--ckpt-path", str(dst), "--config", str(dst / "model_args.json"),
            "--input-file", str(prompts), "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0",
        ]  # fmt: skip
        run: dict = {"mp": mp}
        for how, extra in (("unchanged", []), ("tf4-chat-template launcher", [str(launcher)])):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(mp), *extra, *demo_args]
            print(f"$ torchrun {' '.join(cmd[3:])}", flush=True)
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=demo, capture_output=True, text=True, env=dict(os.environ))
            dt = time.perf_counter() - t
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", flush=True)
            run[how] = {"exit": r.returncode, "seconds": round(dt, 1), "completions": r.stdout.count("Completion")}
            run["exit"] = r.returncode  # the last run's
            if r.returncode == 0 or TF5_SIGNATURE not in r.stderr:
                break
            run[how]["failure"] = "transformers 5's apply_chat_template returns a dict (generate.py expects a list)"
        results.append(run)
    print(json.dumps({"layers": args.layers, "experts": args.experts, "results": results}), flush=True)
    if any(x["exit"] != 0 for x in results):
        raise SystemExit("the upstream demo failed on shard output")


if __name__ == "__main__":
    main()
