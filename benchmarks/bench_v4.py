"""Benchmark DeepSeek-V4's cast (to-bf16, fp4-fp8) and shard on the CPU: wall time against the read+write floor
measured in the same run, and peak RSS.

Input: a synthetic V4-Flash checkpoint in the released format (FP4 experts, E8M0 scales) with its real tensor shapes
(hidden 4096, 64 heads of 512, q_lora 1024, o_groups 8 x o_lora 1024, experts 2048 x 4096, hyper-connections,
compressor and indexer), depth and expert count reduced (default 4 layers: two sliding-window, one compressed 1/4
with the indexer, one 1/128; and the MTP block; 32 experts) and the vocabulary cut to 16384 so that the input is
mostly weights rather than embedding.

For each stage, the floor and the stage alternate (``--repeat`` times): the floor reads every input file and writes
the stage's output byte count to the same disk (``bench_cast.floor`` for the casts: file by file; ``bench_shard.floor``
for shard: into N files), then fsyncs; the input is evicted from the page cache before both. The stage runs in a
fresh subprocess, timed inside it; peak RSS is its VmHWM. Usage::

    python benchmarks/bench_v4.py --workdir /work/bench-tmp/v4 [--layers 4] [--experts 32] [--mp 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench_cast import data_files, drop_cache, machine
from bench_cast import floor as cast_floor
from bench_shard import floor as shard_floor

from dsv3_tools.family import load_config
from dsv3_tools.synth import synth

CHILD = """
import json, os, sys, time
from dsv3_tools import cast, shard
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
stage, src, dst, mp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss0 = hwm()
t = time.perf_counter()
if stage == "to-bf16":
    r = cast.cast_fp8_to_bf16(src, dst, device="cpu")
elif stage == "fp4-fp8":
    r = cast.run_cast(cast.plan_fp4_to_fp8(src, dst))
else:
    r = shard.shard_checkpoint(src, dst, mp=mp)
dt = time.perf_counter() - t
cpu = os.times()
print(json.dumps({"seconds": dt, "cpu_s": cpu.user + cpu.system, "rss_import_kb": rss0, "rss_peak_kb": hwm()}))
"""


def make_input(path: Path, layers: int, experts: int, vocab: int) -> Path:
    if (path / "config.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    cfg = replace(load_config("deepseek-v4-flash"), vocab_size=vocab)
    t = time.perf_counter()
    synth(path, cfg, seed=0, layers=layers, experts=experts)
    print(f"synth: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def run_stage(stage: str, src: Path, dst: Path, mp: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    drop_cache(data_files(src))
    r = subprocess.run(
        [sys.executable, "-c", CHILD, stage, str(src), str(dst), str(mp)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/v4"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--mp", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=["to-bf16", "fp4-fp8", "shard"])
    ap.add_argument("--keep", action="store_true", help="keep the input (default: delete everything)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    src = make_input(a.workdir / "in", a.layers, a.experts, a.vocab)
    inputs = data_files(src)
    bytes_in = sum(p.stat().st_size for p in inputs)
    res = {"machine": machine(), "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    res |= {"input": {"files": len(inputs), "bytes": bytes_in, "layers": a.layers, "experts": a.experts}}
    res["stages"] = {}
    dst = a.workdir / "out"
    try:
        for stage in a.stages:
            run_stage(stage, src, dst, a.mp)  # learn the output sizes
            if stage == "shard":
                sizes = [(dst / f"model{r}-mp{a.mp}.safetensors").stat().st_size for r in range(a.mp)]
            else:
                sizes = [(dst / p.name).stat().st_size for p in inputs]
            runs = []
            for _ in range(a.repeat):
                load = os.getloadavg()[0]
                drop_cache(inputs)
                if stage == "shard":
                    f = shard_floor(src, a.workdir / "floor", sizes)
                else:
                    f = cast_floor(inputs, sizes, a.workdir / "floor")
                s = run_stage(stage, src, dst, a.mp)
                runs.append(
                    {"floor_s": f, "stage_s": s["seconds"], "ratio": s["seconds"] / f, "cpu_s": s["cpu_s"]}
                    | {"rss_peak_mb": s["rss_peak_kb"] / 1024, "rss_import_mb": s["rss_import_kb"] / 1024}
                    | {"load_before": load}
                )
                print(stage, json.dumps(runs[-1]), file=sys.stderr)
            shutil.rmtree(dst, ignore_errors=True)
            res["stages"][stage] = {
                "output_bytes": sum(sizes),
                "runs": runs,
                "ratio_median": statistics.median(r["ratio"] for r in runs),
            }
    finally:
        shutil.rmtree(dst, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    print(f"input {bytes_in / 1e9:.2f} GB in {len(inputs)} files; {res['machine']}")
    print(
        f"{'stage':>8} {'out GB':>7} {'floor s':>8} {'stage s':>8} {'ratio':>6} {'RSS MB':>7} {'CPU s':>6} {'load':>5}"
    )
    for stage, d in res["stages"].items():
        for r in d["runs"]:
            print(
                f"{stage:>8} {d['output_bytes'] / 1e9:7.2f} {r['floor_s']:8.2f} {r['stage_s']:8.2f} {r['ratio']:6.2f}"
                f" {r['rss_peak_mb']:7.0f} {r['cpu_s']:6.1f} {r['load_before']:5.1f}"
            )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
