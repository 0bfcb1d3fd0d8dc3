"""Benchmark ``shard``: wall time against the read+write floor measured in the same run, and peak RSS.

For each size, a synthetic FP8 checkpoint with real DeepSeek-V3 shapes (vocab 129280, hidden 7168, 128 heads,
2048-wide experts; depth and expert count reduced) is written, then for each N:

- floor: read every input file once, sequentially, and write the same number of bytes into N files (fsync'd),
  with plain ``os.preadv`` / ``write`` in 64 MB pieces: what any shard must at least do;
- floor+sha256: the same, also hashing every written byte (the manifest's checksums), for reference;
- shard: ``shard_checkpoint`` in a fresh subprocess, timed inside it, its peak RSS from ``VmHWM``.

It also prints what holding every rank's tensors in RAM at once (the upstream ``convert.py`` design) would need
for the full 671B checkpoint. Usage::

    python benchmarks/bench_shard.py --workdir /work/bench-tmp/shard --mp 4 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dsv3_tools import names as N
from dsv3_tools.config import ModelConfig
from dsv3_tools.stfile import DTYPE_SIZE
from dsv3_tools.synth import synth

SIZES = {  # name: synth arguments (real V3 shapes, reduced depth / experts, no MTP)
    "A": {"layers": 1, "experts": 8},  # embed + head + one dense layer
    "B": {"layers": 4, "experts": 16},  # + two more dense layers and one MoE layer of 16 experts
}
CHILD = """
import json, sys, time
from dsv3_tools.shard import shard_checkpoint
def hwm():  # peak RSS of this process image in kB (ru_maxrss would include the parent's peak before exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
rss0 = hwm()
t = time.perf_counter()
r = shard_checkpoint(sys.argv[1], sys.argv[2], mp=int(sys.argv[3]))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "read": r.bytes_read, "written": r.bytes_written,
                  "sizes": [f.bytes for f in r.files], "rss_import_kb": rss0,
                  "rss_peak_kb": hwm()}))
"""


def floor(src: Path, out: Path, sizes: list[int], checksum: bool = False) -> float:
    """Seconds to read every input data file once and write ``sizes`` bytes into ``len(sizes)`` files, fsync'd.

    ``checksum``: also sha256 every written byte (what the manifest records), in the same thread.
    """
    out.mkdir(parents=True)
    chunk = 64 << 20
    buf = bytearray(chunk)
    mv = memoryview(buf)
    outs = [open(out / f"f{i}", "wb") for i in range(len(sizes))]
    hashes = [hashlib.sha256() for _ in sizes]
    left = list(sizes)
    t = time.perf_counter()
    k = 0
    for p in sorted(src.glob("*.safetensors")):
        fd = os.open(p, os.O_RDONLY)
        pos, size = 0, p.stat().st_size
        while pos < size:
            n = os.preadv(fd, [mv], pos)
            pos += n
            # Spread the bytes over the output files round-robin, each up to its size (shard writes more
            # than it reads: replicated tensors go to every rank).
            while n and any(left):
                while not left[k % len(left)]:
                    k += 1
                i = k % len(left)
                m = min(n, left[i])
                outs[i].write(mv[:m])
                if checksum:
                    hashes[i].update(mv[:m])
                left[i] -= m
                n -= m
                k += 1
        os.close(fd)
    while any(left):  # what the input did not cover: write it again from the last buffer
        for i, f in enumerate(outs):
            m = min(left[i], chunk)
            f.write(mv[:m])
            if checksum:
                hashes[i].update(mv[:m])
            left[i] -= m
    for f in outs:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt


def all_ranks_in_ram(cfg: ModelConfig, world: int) -> int:
    """Bytes of every rank's tensors together: split and expert tensors once, replicated ones ``world`` times."""
    total = 0
    for spec in N.expected_tensors(cfg, mtp=False).values():
        n = DTYPE_SIZE[spec.dtype]
        for d in spec.shape:
            n *= d
        total += n * (world if N.parse_hf(spec.name).split is None else 1)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/shard"))
    ap.add_argument("--mp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    v3 = ModelConfig.builtin("deepseek-v3")
    # Upstream convert.py keeps every rank's state dict until the end; replicated tensors are shared between
    # ranks there, so it needs the whole checkpoint (MTP dropped); separate copies would need the second figure.
    shared = all_ranks_in_ram(v3, 1) / 1e9
    for w in args.mp:
        print(
            f"671B, all ranks in RAM at once, mp={w}: {shared:.1f} GB ({all_ranks_in_ram(v3, w) / 1e9:.1f} GB unshared)"
        )
    results = []
    for size in args.sizes:
        root = args.workdir / size
        if root.exists():
            shutil.rmtree(root)
        src = root / "src"
        t = time.perf_counter()
        synth(src, "deepseek-v3", dtype="fp8", seed=0, shards=8, mtp=0, **SIZES[size])
        in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"size {size}: {in_bytes / 1e9:.2f} GB input ({SIZES[size]}), synth {time.perf_counter() - t:.0f} s")
        for w in args.mp:
            dst = root / f"mp{w}"
            p = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(dst), str(w)], capture_output=True, text=True
            )
            if p.returncode:
                sys.exit(p.stderr)
            r = json.loads(p.stdout)
            shutil.rmtree(dst)
            fl = floor(src, root / "floor", r["sizes"])
            # Alternate shard and floor twice and keep each one's best: the disk is shared and noisy.
            p = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(dst), str(w)], capture_output=True, text=True
            )
            r2 = json.loads(p.stdout)
            shutil.rmtree(dst)
            fl = min(fl, floor(src, root / "floor", r["sizes"]))
            flh = floor(src, root / "floor", r["sizes"], checksum=True)
            sec = min(r["seconds"], r2["seconds"])
            row = {
                "size": size,
                "input_gb": round(in_bytes / 1e9, 2),
                "mp": w,
                "written_gb": round(r["written"] / 1e9, 2),
                "shard_s": round(sec, 2),
                "floor_s": round(fl, 2),
                "ratio": round(sec / fl, 2),
                "floor_sha256_s": round(flh, 2),
                "rss_peak_mb": round(max(r["rss_peak_kb"], r2["rss_peak_kb"]) / 1024),
                "rss_after_import_mb": round(r["rss_import_kb"] / 1024),
            }
            results.append(row)
            print(json.dumps(row))
        shutil.rmtree(root)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
