"""``cast fp8-bf16`` on a GPU machine (H200): floor, cast on cuda, cast on cpu, and proof they wrote the same bytes.

Builds a synthetic FP8 checkpoint of real DeepSeek-V3 tensor shapes (default ~5 GB in 3 files; see bench_cast.py for
what "floor" means), then runs, alternating: floor, cast --device cuda, cast --device cpu (all cores). The cuda and
cpu outputs must be byte-identical file by file (sha256). Prints a table; writes JSON to ``$OUT/gpu_cast.json`` when
``$OUT`` is set. Everything it writes is under ``--workdir`` and deleted at the end. Usage::

    python benchmarks/gpu_cast.py --workdir /tmp/cast-bench [--layers 5 --experts 32 --shards 3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cast import data_files, floor, machine, make_input, output_sizes, run_cast  # noqa: E402


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != "dsv3-manifest.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(64 << 20):
                    h.update(b)
            out[p.name] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cast-bench"))
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-cpu", action="store_true", help="only floor and cuda")
    ap.add_argument("--gpu-device", default="cuda", help="the device of the GPU run (cpu: a smoke test of this script)")
    a = ap.parse_args()

    t = time.perf_counter()
    src = make_input(a.workdir / "fp8", a.layers, a.experts, a.vocab, a.shards)
    synth_s = time.perf_counter() - t
    inputs = data_files(src)
    bytes_in = sum(p.stat().st_size for p in inputs)
    rows, same = [], None
    try:
        gpu_dst, cpu_dst = a.workdir / "bf16-cuda", a.workdir / "bf16-cpu"
        for i in range(a.repeat):
            g = run_cast(src, gpu_dst, a.gpu_device, None)
            sizes = output_sizes(src, gpu_dst)
            ref = digests(gpu_dst) if i == 0 else None
            shutil.rmtree(gpu_dst)
            f = floor(inputs, sizes, a.workdir / "floor")
            rows.append({"what": "floor (read in + write out, fsync)", "seconds": f, "rss_mb": None})
            rows.append(
                {"what": f"cast --device {a.gpu_device}", "seconds": g["seconds"], "rss_mb": g["rss_peak_kb"] / 1024}
            )
            if not a.skip_cpu:
                c = run_cast(src, cpu_dst, "cpu", None)
                rows.append({"what": "cast --device cpu", "seconds": c["seconds"], "rss_mb": c["rss_peak_kb"] / 1024})
                if ref is not None:
                    same = digests(cpu_dst) == ref
                shutil.rmtree(cpu_dst)
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)
    fl = min(r["seconds"] for r in rows if r["what"].startswith("floor"))
    print(
        f"input {bytes_in / 1e9:.2f} GB in {len(inputs)} files -> output {sum(sizes) / 1e9:.2f} GB (synth {synth_s:.0f} s)"
    )
    print(f"{'what':<36} {'s':>7} {'GB/s in':>8} {'x floor':>8} {'RSS MB':>7}")
    for r in rows:
        rss = f"{r['rss_mb']:7.0f}" if r["rss_mb"] else f"{'':>7}"
        print(
            f"{r['what']:<36} {r['seconds']:7.2f} {bytes_in / r['seconds'] / 1e9:8.2f} {r['seconds'] / fl:8.2f} {rss}"
        )
    print(f"cuda and cpu outputs byte-identical: {same}")
    res = {
        "machine": machine(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "bytes_in": bytes_in,
        "bytes_out": sum(sizes),
        "files": len(inputs),
        "rows": rows,
        "floor_s": fl,
        "cuda_cpu_identical": same,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "gpu_cast.json").write_text(json.dumps(res, indent=2) + "\n")
    if same is False:
        raise SystemExit("cuda and cpu outputs differ")


if __name__ == "__main__":
    main()
