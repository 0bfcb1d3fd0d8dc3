"""Benchmark ``cast fp8-bf16``: wall time against the read+write floor measured in the same run, and peak RSS.

Input: a synthetic FP8 checkpoint of real DeepSeek-V3 tensor shapes (hidden 7168, 128 heads, q_lora 1536, kv_a
576x7168, o_proj 7168x16384, dense MLP 18432x7168, experts 2048x7168); depth, expert count and vocabulary reduced
so that it is mostly FP8 weights (the full 129280-row embedding and head would make it a BF16 copy benchmark).

- floor: for each input file, a plain Python loop reads it in 64 MB pieces and writes, into a file on the same disk,
  as many bytes as the cast's output file has; then fsync. The input's page cache is dropped first
  (``posix_fadvise(DONTNEED)``), for the floor and for the cast alike.
- cast: ``cast_fp8_to_bf16`` in a fresh subprocess, timed inside it; peak RSS is the child's VmHWM.

Runs alternate floor, cast, floor, cast ... (``--repeat``) because the disk is shared and noisy. Usage::

    python benchmarks/bench_cast.py --workdir /work/bench-tmp/cast [--device cpu] [--repeat 2] [--json out.json]

``benchmarks/gpu_cast.py`` reuses these pieces on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.synth import synth

CHILD = """
import json, os, sys, time
from dsv3_tools.cast import cast_fp8_to_bf16
def hwm():  # this process image's peak RSS in kB (ru_maxrss of a child can include the parent's peak before exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
rss0 = hwm()
workers = int(sys.argv[4]) if sys.argv[4] != "0" else None
t = time.perf_counter()
r = cast_fp8_to_bf16(sys.argv[1], sys.argv[2], device=sys.argv[3], workers=workers)
dt = time.perf_counter() - t
cpu = os.times()
print(json.dumps({"seconds": dt, "cpu_s": cpu.user + cpu.system, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "device": r.device,
                  "rss_import_kb": rss0, "rss_peak_kb": hwm()}))
"""


def make_input(path: Path, layers: int, experts: int, vocab: int, shards: int) -> Path:
    """The synthetic FP8 input (kept between runs of the benchmark when already complete)."""
    if (path / "config.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    cfg = replace(ModelConfig.builtin("deepseek-v3"), vocab_size=vocab)
    t = time.perf_counter()
    synth(path, cfg, dtype="fp8", seed=0, shards=shards, layers=layers, experts=experts, mtp=0)
    print(f"synth: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def data_files(src: Path) -> list[Path]:
    return [src / f for f in sorted(open_checkpoint(src, read_config=False).files)]


def drop_cache(paths: list[Path]) -> None:
    """Evict these files from the page cache, so that reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def floor(inputs: list[Path], out_sizes: list[int], out: Path) -> float:
    """Seconds to read each input file and write its output's byte count to the same disk, plain Python, fsync'd."""
    out.mkdir(parents=True, exist_ok=True)
    chunk = 64 << 20
    buf = bytearray(chunk)
    mv = memoryview(buf)
    drop_cache(inputs)
    t = time.perf_counter()
    for i, (src, size) in enumerate(zip(inputs, out_sizes)):
        ratio = size / src.stat().st_size
        written = 0
        with open(src, "rb", buffering=0) as fi, open(out / f"floor{i}", "wb", buffering=0) as fo:
            read = 0
            while True:
                n = fi.readinto(mv)
                if not n:
                    break
                read += n
                want = min(size, round(read * ratio))
                while written < want:
                    written += fo.write(mv[: min(chunk, want - written)])
            while written < size:
                written += fo.write(mv[: min(chunk, size - written)])
            os.fsync(fo.fileno())
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt


def run_cast(src: Path, dst: Path, device: str, workers: int | None) -> dict:
    """The cast in a fresh process: its own wall time and peak RSS."""
    shutil.rmtree(dst, ignore_errors=True)
    drop_cache(data_files(src))
    cmd = [sys.executable, "-c", CHILD, str(src), str(dst), device, str(workers or 0)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cast failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def output_sizes(src: Path, dst: Path) -> list[int]:
    return [(dst / p.name).stat().st_size for p in data_files(src)]


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) / 2**20
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/cast"))
    ap.add_argument("--layers", type=int, default=5, help="3 dense + (layers - 3) MoE layers")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the input and output (default: delete them)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    src = make_input(a.workdir / "fp8", a.layers, a.experts, a.vocab, a.shards)
    dst = a.workdir / "bf16"
    inputs = data_files(src)
    bytes_in = sum(p.stat().st_size for p in inputs)
    runs = []
    try:
        first = run_cast(src, dst, a.device, a.workers)  # also gives the output sizes the floor writes
        sizes = output_sizes(src, dst)
        shutil.rmtree(dst)
        for _ in range(a.repeat):
            load = os.getloadavg()[0]
            f = floor(inputs, sizes, a.workdir / "floor")
            c = run_cast(src, dst, a.device, a.workers)
            shutil.rmtree(dst)
            runs.append(
                {
                    "floor_s": f,
                    "cast_s": c["seconds"],
                    "ratio": c["seconds"] / f,
                    "rss_peak_kb": c["rss_peak_kb"],
                    "cast_cpu_s": c["cpu_s"],
                    "load_before": load,
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    res = {
        "machine": machine(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "input": {"files": len(inputs), "bytes": bytes_in, "layers": a.layers, "experts": a.experts, "vocab": a.vocab},
        "output_bytes": sum(sizes),
        "device": first["device"],
        "runs": runs,
        "ratio_median": statistics.median(r["ratio"] for r in runs),
        "ratio_best": min(r["ratio"] for r in runs),
        "rss_peak_mb": max(r["rss_peak_kb"] for r in runs) / 1024,
    }
    print(f"{'run':>4} {'floor s':>8} {'cast s':>8} {'ratio':>6} {'RSS MB':>7} {'cast CPU s':>10} {'load':>5}")
    for i, r in enumerate(runs):
        print(
            f"{i:>4} {r['floor_s']:8.2f} {r['cast_s']:8.2f} {r['ratio']:6.2f} {r['rss_peak_kb'] / 1024:7.0f}"
            f" {r['cast_cpu_s']:10.1f} {r['load_before']:5.1f}"
        )
    gb_in, gb_out = bytes_in / 1e9, sum(sizes) / 1e9
    print(
        f"input {gb_in:.2f} GB in {len(inputs)} files -> output {gb_out:.2f} GB; median ratio {res['ratio_median']:.2f}"
    )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
