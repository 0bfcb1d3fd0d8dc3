"""``verify`` in streaming mode on a GPU, against the time to read the same bytes from disk, and its peak GPU memory.

    python benchmarks/gpu_verify.py --dir /work/bench-tmp/verify [--layers auto|N] [--experts 256] [--dtype float32]
    (within a per-command time limit: first ``--build-only``, then the same command with ``--keep`` or without)

Builds a synthetic checkpoint with DeepSeek-V3's real layer shapes (hidden 7168, 128 heads, 256 experts 2048 wide,
dense 18432, vocab 129280; FP8 with 128x128 scales; ~4.5 GB files with an index) and as many full-size layers as
the disk allows (``--layers auto``: the 3 dense layers, then MoE layers of ~11.4 GB each, within ``--max-gb``).
Random tensors are generated once per shape and their bytes reused, so writing runs at disk speed (the values do not
change what is read or computed). Then, with the page cache of the checkpoint's files dropped before each step
(``posix_fadvise(DONTNEED)``, no root needed):

1. floor: read every tensor's bytes with positioned reads in 64 MB chunks (what any loader must do at least);
2. ``verify --save-reference`` (structure + one streamed model run + the reference file);
3. ``verify --reference`` (structure + one streamed run + the comparison; expected verdict: exact, bit-identical).

Prints a table (seconds, GB/s, ratio to the floor, peak GPU memory) and the projection for the full 671B checkpoint
(time = measured ratio x its bytes / measured disk speed; GPU memory = the measured peak, one MoE layer at a time);
writes ``$OUT/gpu_verify.json`` when ``OUT`` is set. Deletes the checkpoint unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from dsv3_tools import names as N
from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.kernels.weight_quant import weight_quant_ref
from dsv3_tools.layout import INDEX_NAME
from dsv3_tools.stfile import DTYPE_SIZE
from dsv3_tools.synth import derive_config
from dsv3_tools.tokenizer_files import write_tokenizer_files
from dsv3_tools.verify import verify_checkpoint
from dsv3_tools.writer import SafetensorsWriter, write_json_atomic

GB = 1e9
FILE_BYTES = int(4.5 * GB)


def nbytes(spec: N.TensorSpec) -> int:
    return math.prod(spec.shape) * DTYPE_SIZE[spec.dtype]


def geometry(layers: int, experts: int | None, config: str = "deepseek-v3") -> ModelConfig:
    return derive_config(ModelConfig.load(config), dtype="fp8", layers=layers, experts=experts, mtp=0)


def layer_sizes(cfg: ModelConfig) -> dict[int | None, int]:
    out: dict[int | None, int] = {}
    for spec in N.expected_tensors(cfg, mtp=False).values():
        L = N.parse_hf(spec.name).layer
        out[L] = out.get(L, 0) + nbytes(spec)
    return out


def auto_layers(experts: int | None, budget: float, config: str) -> int:
    """The most layers (dense first, then MoE) whose checkpoint fits in ``budget`` bytes; at least 4, at most all."""
    n, most = 4, ModelConfig.load(config).num_hidden_layers
    while n < most and sum(layer_sizes(geometry(n + 1, experts, config)).values()) <= budget:
        n += 1
    return n


class Bytes:
    """Random tensor bytes, generated once per (kind, shape, dtype) and reused."""

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block
        self.cache: dict[tuple, torch.Tensor] = {}
        self.g = torch.Generator().manual_seed(0)

    def get(self, spec: N.TensorSpec, specs: dict[str, N.TensorSpec]) -> torch.Tensor:
        n = N.parse_hf(spec.name)
        kind = ("scale" if n.is_scale else n.leaf, n.module.hf.endswith("embed_tokens"))
        shape = spec.shape
        if n.is_scale:
            shape = specs[n.weight_name].shape
        key = (kind, shape, spec.dtype)
        if key not in self.cache:
            if len(shape) == 1:
                t = 1.0 + 0.1 * torch.randn(shape, generator=self.g)
                if n.leaf == "e_score_correction_bias":
                    t = 0.05 * torch.randn(shape, generator=self.g)
            else:
                t = torch.randn(shape, generator=self.g) / (1.0 if kind[1] else math.sqrt(shape[1]))
            if spec.dtype == "F8_E4M3" or n.is_scale:
                q, s = weight_quant_ref(t, self.block, None)
                self.cache[(("weight", False), shape, "F8_E4M3")] = q
                self.cache[(("scale", False), shape, "F32")] = s
            else:
                self.cache[key] = t.to(torch.float32 if spec.dtype == "F32" else torch.bfloat16)
        return self.cache[key]


def build(path: Path, cfg: ModelConfig) -> int:
    """Write the HF-layout checkpoint; return its tensor bytes."""
    path.mkdir(parents=True)
    specs = N.expected_tensors(cfg, mtp=False)
    groups: list[list[N.TensorSpec]] = [[]]
    acc = 0
    for spec in specs.values():
        if acc > FILE_BYTES:
            groups.append([])
            acc = 0
        groups[-1].append(spec)
        acc += nbytes(spec)
    src = Bytes(cfg.block_size)
    wmap, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors"
        w = SafetensorsWriter(path / name, [(s.name, s.dtype, s.shape) for s in group], {"format": "pt"})
        for s in group:
            w.write(s.name, src.get(s, specs))
            wmap[s.name] = name
            total += nbytes(s)
        w.finish()
        print(f"  wrote {name} ({sum(nbytes(s) for s in group) / GB:.1f} GB)", flush=True)
    write_json_atomic(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": wmap})
    write_json_atomic(path / "config.json", cfg.to_hf_dict())
    write_tokenizer_files(path, cfg)
    return total


def drop_cache(path: Path) -> None:
    for p in path.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_floor(path: Path) -> tuple[float, int]:
    """Seconds to read every tensor's bytes (positioned reads, 64 MB chunks into one buffer)."""
    ck = open_checkpoint(path)
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    n = 0
    t = time.perf_counter()
    for rel in ck.files:
        fd = os.open(path / rel, os.O_RDONLY)
        h = ck.headers[rel]
        pos, end = h.data_start, h.size
        while pos < end:
            k = os.preadv(fd, [mv[: min(len(buf), end - pos)]], pos)
            pos += k
            n += k
        os.close(fd)
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/work/bench-tmp/verify")
    ap.add_argument("--layers", default="auto", help="main layers (3 dense, then MoE), or auto")
    ap.add_argument("--config", default="deepseek-v3", help="geometry (tiny: a CPU smoke run)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts (default: the config's, 256)")
    ap.add_argument("--max-gb", type=float, default=40.0, help="largest checkpoint auto may build")
    ap.add_argument("--dtype", default="float32", help="verify's compute dtype")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engine", default=None, help="default: triton on cuda, torch on cpu")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse it next time)")
    ap.add_argument("--build-only", action="store_true", help="build the checkpoint (kept) and stop")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    engine = args.engine or ("triton" if cuda else "torch")
    root = Path(args.dir)
    ckpt = root / "ckpt"
    ref = root / "ref.safetensors"
    if not (ckpt / "config.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        budget = min(args.max_gb * GB, 0.7 * free)
        layers = auto_layers(args.experts, budget, args.config) if args.layers == "auto" else int(args.layers)
        cfg = geometry(layers, args.experts, args.config)
        print(
            f"building {layers} layers ({cfg.first_k_dense_replace} dense) x {cfg.n_routed_experts} experts in {ckpt}"
        )
        t = time.perf_counter()
        build(ckpt, cfg)
        print(f"build: {time.perf_counter() - t:.1f} s", flush=True)
    if args.build_only:
        return 0
    cfg = open_checkpoint(ckpt).config
    sizes = layer_sizes(cfg)
    total = sum(sizes.values())

    drop_cache(ckpt)
    floor_s, floor_b = read_floor(ckpt)
    speed = floor_b / floor_s
    rows = [dict(step="read every byte (floor)", seconds=floor_s, gb_per_s=speed / GB, ratio=1.0)]
    print(f"floor: {floor_b / GB:.1f} GB in {floor_s:.1f} s = {speed / GB:.2f} GB/s", flush=True)

    results = {}
    for step, kw in (("verify --save-reference", {"save_reference": ref}), ("verify --reference", {"reference": ref})):
        drop_cache(ckpt)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = verify_checkpoint(
            ckpt,
            device=args.device,
            engine=engine,
            stream=True,
            dtype=args.dtype,
            notify=lambda e, d: print(e, d if e != "structure" else ""),
            **kw,
        )
        s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        results[step] = r
        rows.append(
            dict(
                step=step,
                seconds=s,
                gb_per_s=total / s / GB,
                ratio=s / floor_s,
                model_seconds=r.seconds.get("model"),
                verdict=r.verdict,
                tier=r.tier,
                peak_gpu_gb=peak / GB if peak is not None else None,
                reserved_gpu_gb=reserved / GB if reserved is not None else None,
            )
        )
    full = ModelConfig.load("deepseek-v3")
    full_bytes = sum(layer_sizes(full.with_layers(full.num_hidden_layers, mtp=0)).values())
    worst = max(r["ratio"] for r in rows[1:])
    peak = max((r["peak_gpu_gb"] or 0) for r in rows[1:])
    projection = dict(
        bytes=full_bytes,
        seconds_at_measured_disk=worst * full_bytes / speed,
        peak_gpu_gb=peak,
        note="streamed: one layer at a time, so the GPU peak is that of one MoE layer (same shapes as measured)",
    )

    print()
    print(f"{'step':28s} {'seconds':>9s} {'GB/s':>7s} {'x floor':>8s} {'peak GPU GB':>12s}  verdict")
    for r in rows:
        pk = f"{r['peak_gpu_gb']:.1f}" if r.get("peak_gpu_gb") is not None else "-"
        v = f"{r.get('verdict', '')} {r.get('tier') or ''}"
        print(f"{r['step']:28s} {r['seconds']:9.1f} {r['gb_per_s']:7.2f} {r['ratio']:8.2f} {pk:>12s}  {v}")
    print(
        f"\n671B projection: {full_bytes / GB:.0f} GB of tensors -> ~{projection['seconds_at_measured_disk'] / 60:.0f} "
        f"min per streamed verify at {speed / GB:.2f} GB/s, peak GPU ~{peak:.0f} GB"
    )
    machine = dict(
        gpu=torch.cuda.get_device_name() if cuda else None,
        cpus=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    doc = dict(
        command=" ".join(sys.argv),
        machine=machine,
        checkpoint=dict(
            layers=cfg.num_hidden_layers,
            dense_layers=cfg.first_k_dense_replace,
            experts=cfg.n_routed_experts,
            bytes=total,
            largest_layer_bytes=max(v for k, v in sizes.items() if k is not None),
        ),
        dtype=args.dtype,
        engine=engine,
        rows=rows,
        projection_671b=projection,
    )
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_verify.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    ok = all(r.verdict == "pass" for r in results.values()) and results["verify --reference"].tier == "exact"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
