"""Benchmark ``download`` against huggingface_hub's own ``snapshot_download``, both served by the loopback Hub.

A repository of K safetensors files (one uint8 tensor each, S MB) is served from memory by tests/hub_server.py on
127.0.0.1. Measured in the same run:

- floor: ``snapshot_download(local_dir=...)``, the library's plain HTTP path (size check only, no hashing);
- ``download(verify=True)`` (sha256 + header of every file before it is moved into place) and ``verify=False``;
- resume: a child process is SIGKILLed once the server has sent about half of the bytes, then the same tool runs
  again; the bytes the server sends to the second run are counted (huggingface_hub restarts a killed file from 0).

Usage::

    python benchmarks/bench_download.py --workdir /work/bench-tmp/download --files 4 --mb 256 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import HubServer  # noqa: E402

REPO = "bench/blob"
CHILD_OURS = (
    "import sys; from dsv3_tools.download import download; "
    "download(sys.argv[1], local_dir=sys.argv[2], endpoint=sys.argv[3], token=False, cache_dir=sys.argv[4])"
)
CHILD_HF = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(sys.argv[1], local_dir=sys.argv[2], endpoint=sys.argv[3], token=False, cache_dir=sys.argv[4])"
)


def safetensors_file(mb: int, seed: int) -> bytes:
    n = mb << 20
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + os.urandom(n)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def killed_then_rerun(hub: HubServer, child: str, work: Path, total: int) -> tuple[int, int]:
    """SIGKILL ``child`` after about half of ``total`` bytes were served; return (served before, served by re-run)."""
    out, cache = work / "out", work / "cache"
    hub.state.reset_counters()
    hub.state.throttle_bps = 64 << 20  # per response: keeps the kill point predictable
    args = [sys.executable, "-c", child, REPO, str(out), hub.endpoint, str(cache)]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while hub.state.total_served() < total // 2 and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = hub.state.total_served()
    hub.state.throttle_bps = None
    hub.state.reset_counters()
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return before, hub.state.total_served()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from huggingface_hub import snapshot_download

    from dsv3_tools.download import download

    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    files = {f"model-{i:05d}-of-{a.files:05d}.safetensors": safetensors_file(a.mb, i) for i in range(a.files)}
    total = sum(map(len, files.values()))
    print(f"machine: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"repo: {a.files} files x {a.mb} MB = {total / 1e9:.2f} GB, served from memory on 127.0.0.1")
    with HubServer() as hub:
        hub.add_repo(REPO, {"main": files})
        common = {"endpoint": hub.endpoint, "token": False, "cache_dir": str(a.workdir / "cache")}
        snapshot_download(REPO, local_dir=a.workdir / "warm", **common)  # server hashes + page cache, untimed
        shutil.rmtree(a.workdir / "warm")
        # Interleaved repetitions, best of each: the machine is shared, so single timings are noisy.
        runs = {
            "snapshot_download (floor)": lambda d: snapshot_download(REPO, local_dir=d, **common),
            "download(verify=True)": lambda d: download(REPO, local_dir=d, **common),
            "download(verify=False)": lambda d: download(REPO, local_dir=d, verify=False, **common),
        }
        best = dict.fromkeys(runs, float("inf"))
        for rep in range(a.reps):
            for name, fn in runs.items():
                d = a.workdir / f"run-{rep}"
                best[name] = min(best[name], timed(lambda fn=fn, d=d: fn(d)))
                shutil.rmtree(d)
        t_floor = best["snapshot_download (floor)"]
        rows = list(best.items())
        for name, t in rows:
            print(f"{name:28s} {t:6.2f} s  {total / t / 1e6:7.1f} MB/s  x{t / t_floor:.2f} of the floor")
        for name, child in (("download", CHILD_OURS), ("snapshot_download", CHILD_HF)):
            w = a.workdir / f"kill-{name}"
            before, after = killed_then_rerun(hub, child, w, total)
            print(
                f"SIGKILL after {before / total:4.0%} served, re-run of {name:17s} served {after / total:4.0%} "
                f"({after / 1e6:.0f} MB; the remainder is {(total - before) / 1e6:.0f} MB)"
            )
            shutil.rmtree(w)
    shutil.rmtree(a.workdir)


if __name__ == "__main__":
    main()
