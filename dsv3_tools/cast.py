"""``cast fp8-bf16`` and ``cast bf16-fp8``: stream a checkpoint between block-FP8 and BF16, file by file.

fp8-bf16: every F8_E4M3 weight with a scale becomes ``bf16(f32(w) * s[i // B0, j // B1])`` (one RNE rounding, B from
``weight_block_size``, ceil grid for ragged edges); every other tensor passes through byte-identical. bf16-fp8
re-quantizes exactly the weights that were FP8 (recorded in the manifest by fp8-bf16; else the name table's default).

Both write a complete Hugging Face folder: the same shard names, the index with ``total_size``, ``config.json``
with the right ``quantization_config``, ``format: pt`` metadata, every sidecar file copied, and a manifest with
checksums that makes an interrupted run resumable. The input is validated before anything is written; memory stays
at a few chunks of a tensor (reads of exactly the bytes needed; a scale stored in another file is read alone).
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import names as N
from .checkpoint import DTYPE_SIZE, DTYPES, INDEX_NAME, Checkpoint, TensorInfo, nbytes, open_checkpoint
from .errors import ConfigError, DeviceError, LayoutError, OutputError, check_device
from .writer import (
    PARTIAL_SUFFIX,
    Manifest,
    SafetensorsWriter,
    check_separate,
    copy_file_atomic,
    free_bytes,
    plan_header,
    read_manifest,
    sidecar_files,
    source_fingerprint,
    tensor_bytes,
    write_json_atomic,
)

Progress = Callable[[int], None]
FP8_BF16 = "fp8-bf16"
BF16_FP8 = "bf16-fp8"
MTP_MODES = ("keep", "drop")
SCALE_FMTS = ("f32", "ue8m0")
COPY_CHUNK = 32 << 20  # bytes per read of a pass-through tensor
CPU_CHUNK = 4 << 20  # FP8 elements per dequant step on CPU (8 MB of BF16 out)
GPU_CHUNK = 64 << 20  # FP8 elements per kernel launch
# Test hooks: send this process a signal (SIGKILL, or the one named by KILL_SIGNAL, e.g. INT for Ctrl-C) once N
# output files are finished and the next one is partly written.
KILL_HOOK = "DSV3_TOOLS_TEST_KILL_AFTER_FILES"
KILL_SIGNAL = "DSV3_TOOLS_TEST_KILL_SIGNAL"


@dataclass
class CastFile:
    name: str
    tensors: int
    bytes_in: int  # tensor bytes read from the input (scales from other files included)
    bytes_out: int  # size of the output file
    status: str = "planned"  # planned | written | kept


@dataclass
class CastReport:
    direction: str
    src: str
    dst: str
    device: str
    dry_run: bool
    files: list[CastFile]
    sidecars: list[str]
    tensors_cast: int
    tensors_copied: int
    tensors_dropped: int
    bytes_in: int
    bytes_out: int
    bytes_needed: int  # what is still to be written (finished files of an earlier run excluded)
    free_bytes: int
    seconds: float = 0.0
    scale_fmt: str | None = None
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Op:
    kind: str  # "copy" | "dequant" | "quant"
    info: TensorInfo
    scale: TensorInfo | None = None  # dequant: the scale tensor (possibly in another file)


@dataclass
class _FilePlan:
    name: str
    entries: list[tuple[str, str, tuple[int, ...]]]
    ops: list[_Op]
    bytes_in: int
    size: int


# ---------------------------------------------------------------------- public API
def cast_fp8_to_bf16(
    src: str | Path,
    dst: str | Path,
    *,
    device: str = "auto",
    workers: int | None = None,
    mtp: str = "keep",
    dry_run: bool = False,
    progress: Progress | None = None,
) -> CastReport:
    """Dequantize a block-FP8 checkpoint folder into a new BF16 folder ``dst``."""
    src, dst = Path(src), Path(dst)
    _check_mtp(mtp)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"--workers must be a positive number of threads, got {workers!r}")
    ck = _open_input(src)
    cfg = ck.config
    if not cfg.is_fp8:
        raise ConfigError(f"{src}: not an FP8 checkpoint (config.json has no quantization_config)")
    dev = resolve_device(device)
    block = cfg.block_size
    plans, dropped = _plan(ck, FP8_BF16, mtp=mtp, selected=set(), block=block)
    fp8_weights = sorted(op.info.name for p in plans for op in p.ops if op.kind == "dequant")
    sidecars = sidecar_files(src)
    job = {
        "stage": "cast",
        "direction": FP8_BF16,
        "mtp": mtp,
        "source": _fingerprint(src, ck, sidecars),
    }
    qc = json.loads((src / "config.json").read_text()).get("quantization_config")
    extra = {"fp8_weights": fp8_weights, "quantization_config": qc, "block": list(block)}
    return _run(
        ck, dst, FP8_BF16, plans, dropped, sidecars, job, extra, dev, workers, mtp, dry_run, progress,
        block=block, scale_fmt=None, n_cast=len(fp8_weights),
    )  # fmt: skip


def cast_bf16_to_fp8(
    src: str | Path,
    dst: str | Path,
    *,
    scale_fmt: str | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    mtp: str = "keep",
    dry_run: bool = False,
    progress: Progress | None = None,
) -> CastReport:
    """Re-quantize a BF16 checkpoint folder to DeepSeek's block-FP8 format in a new folder ``dst``.

    The weights quantized are those that were FP8 before ``cast fp8-bf16`` (from its manifest in ``src``), or
    else ``names.quantizable_weights``; minus any matching an ``ignore`` fnmatch pattern. ``scale_fmt`` None: the
    original checkpoint's (ue8m0 if its quantization_config, kept in that manifest, said so), else f32.
    """
    src, dst = Path(src), Path(dst)
    _check_mtp(mtp)
    if scale_fmt is not None and scale_fmt not in SCALE_FMTS:
        raise ConfigError(f"--scale-fmt must be one of {', '.join(SCALE_FMTS)}, got {scale_fmt!r}")
    ck = _open_input(src)
    cfg = ck.config
    if cfg.is_fp8:
        raise ConfigError(f"{src}: already an FP8 checkpoint (config.json has a quantization_config)")
    record = read_manifest(src) or {}
    rjob, rextra = record.get("job") or {}, record.get("extra") or {}
    if rjob.get("stage") == "cast" and rjob.get("direction") == FP8_BF16 and "fp8_weights" in rextra:
        wanted, origin = set(rextra["fp8_weights"]), "manifest"
        orig_qc = rextra.get("quantization_config") or {}
        block = tuple(rextra.get("block") or (128, 128))
    else:
        wanted, origin = set(N.quantizable_weights(cfg)), "name table"
        orig_qc, block = {}, (128, 128)
    if scale_fmt is None:
        scale_fmt = "ue8m0" if orig_qc.get("scale_fmt") == "ue8m0" else "f32"
    selected = {n for n in wanted if n in ck.tensors and not any(fnmatch.fnmatchcase(n, p) for p in ignore)}
    for name in sorted(selected):
        info = ck.tensors[name]
        if len(info.shape) != 2 or info.dtype not in ("BF16", "F16", "F32"):
            raise ConfigError(
                f"tensor {name!r}: cannot quantize {info.dtype}{list(info.shape)} (listed by the {origin})"
            )
    plans, dropped = _plan(ck, BF16_FP8, mtp=mtp, selected=selected, block=block)
    sidecars = sidecar_files(src)
    fmt = None if scale_fmt == "f32" else scale_fmt
    job = {
        "stage": "cast",
        "direction": BF16_FP8,
        "mtp": mtp,
        "scale_fmt": scale_fmt,
        "ignore": sorted(ignore),
        "source": _fingerprint(src, ck, sidecars),
    }
    qc = {k: v for k, v in orig_qc.items() if k != "scale_fmt"}
    qc.update({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)})
    qc.setdefault("activation_scheme", "dynamic")
    if fmt:
        qc["scale_fmt"] = fmt
    fp8_weights = sorted(n for n in selected if not (mtp == "drop" and N.is_mtp_name(cfg, n)))
    kept_bf16 = sorted(
        set(orig_qc.get("modules_to_not_convert") or ())
        | {
            n.removesuffix(".weight")
            for n in wanted
            if n in ck.tensors and n not in selected and not (mtp == "drop" and N.is_mtp_name(cfg, n))
        }
    )
    if kept_bf16:  # so that loaders (and our own validation) expect these weights in BF16
        qc["modules_to_not_convert"] = kept_bf16
    else:
        qc.pop("modules_to_not_convert", None)
    extra = {"fp8_weights": fp8_weights, "quantization_config": qc, "block": list(block), "selected_by": origin}
    return _run(
        ck, dst, BF16_FP8, plans, dropped, sidecars, job, extra, "cpu", None, mtp, dry_run, progress,
        block=block, scale_fmt=fmt, n_cast=len(fp8_weights),
    )  # fmt: skip


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU and the Triton dequant kernel are available, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and _gpu_kernel(required=False) is not None else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        check_device(device)
        _gpu_kernel(required=True)
        return device
    raise DeviceError(f"--device must be auto, cpu or cuda, got {device!r}")


# ---------------------------------------------------------------------- planning
def _check_mtp(mtp: str) -> None:
    if mtp not in MTP_MODES:
        raise ConfigError(f"--mtp must be keep or drop, got {mtp!r}")


def _open_input(src: Path) -> Checkpoint:
    """Open and fully validate the input (scales, names, shapes) before anything is written."""
    ck = open_checkpoint(src, strict=True)
    if ck.layout == "mp":
        raise LayoutError(f"{src}: cast reads Hugging Face folders; this is the model-parallel layout")
    if ck.config is None:
        raise ConfigError(f"{src}: folder has no config.json")
    return ck


def _plan(
    ck: Checkpoint, direction: str, *, mtp: str, selected: set[str], block: tuple[int, int]
) -> tuple[list[_FilePlan], int]:
    """Output files (same names as the input's), their tensors in input byte order, and the work for each."""
    plans: list[_FilePlan] = []
    dropped = 0
    for rel in sorted(ck.files):
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        ops: list[_Op] = []
        bytes_in = 0
        for info in sorted(ck.headers[rel].tensors.values(), key=lambda i: i.start):
            name = info.name
            if mtp == "drop" and N.is_mtp_name(ck.config, name):
                dropped += 1
                continue
            if direction == FP8_BF16:
                if name.endswith("_scale_inv"):
                    continue  # consumed with its weight
                if info.dtype == "F8_E4M3":
                    sinfo = ck.tensors[N.scale_name(name)]  # presence and shape checked by open_checkpoint
                    entries.append((name, "BF16", info.shape))
                    ops.append(_Op("dequant", info, sinfo))
                    bytes_in += info.nbytes + sinfo.nbytes
                    continue
            elif name in selected:
                grid = tuple(-(-d // b) for d, b in zip(info.shape, block))
                entries += [(name, "F8_E4M3", info.shape), (N.scale_name(name), "F32", grid)]
                ops.append(_Op("quant", info))
                bytes_in += info.nbytes
                continue
            entries.append((name, info.dtype, info.shape))
            ops.append(_Op("copy", info))
            bytes_in += info.nbytes
        if entries:
            header, _ = plan_header(entries, {"format": "pt"})
            size = len(header) + sum(nbytes(d, s) for _, d, s in entries)
            plans.append(_FilePlan(rel, entries, ops, bytes_in, size))
    return plans, dropped


def _fingerprint(src: Path, ck: Checkpoint, sidecars: list[str]) -> list:
    return source_fingerprint(src, [*ck.files, "config.json", *sidecars])


# ---------------------------------------------------------------------- running
def _run(
    ck: Checkpoint,
    dst: Path,
    direction: str,
    plans: list[_FilePlan],
    dropped: int,
    sidecars: list[str],
    job: dict,
    extra: dict,
    device: str,
    workers: int | None,
    mtp: str,
    dry_run: bool,
    progress: Progress | None,
    *,
    block: tuple[int, int],
    scale_fmt: str | None,
    n_cast: int,
) -> CastReport:
    t0 = time.perf_counter()
    src = ck.path
    check_separate(src, dst)
    done = _finished_before(dst, job)
    files = [
        CastFile(p.name, len(p.entries), p.bytes_in, p.size, "kept" if p.name in done else "planned") for p in plans
    ]
    side_bytes = sum((src / s).stat().st_size for s in sidecars)
    needed = sum(f.bytes_out for f in files if f.status != "kept") + side_bytes + (1 << 20)  # + config, index
    free = free_bytes(dst)
    n_copied = sum(1 for p in plans for op in p.ops if op.kind == "copy")
    report = CastReport(
        direction, str(src), str(dst), device, dry_run, files, sidecars, n_cast, n_copied, dropped,
        sum(p.bytes_in for p in plans), sum(p.size for p in plans), needed, free, scale_fmt=scale_fmt,
    )  # fmt: skip
    if needed > free:
        raise OutputError(f"{dst}: the output needs {_gb(needed)} more but only {_gb(free)} is free there")
    if dry_run:
        return report

    man = Manifest.open(dst, job)
    for p in dst.rglob("." + "*" + PARTIAL_SUFFIX):  # sidecars in sub-folders too
        p.unlink()
    advance = progress or (lambda n: None)
    kill_after = int(os.environ.get(KILL_HOOK, "-1"))
    # Parallelism comes from a pool of threads each running single-threaded torch ops on its own chunk: on a
    # busy machine, torch's intra-op pool (a barrier per op) was measured 10-100x slower than this.
    old_threads = torch.get_num_threads()
    n_workers = 1 if device != "cpu" else max(1, workers or os.cpu_count() or 1)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="dsv3-cast")
    torch.set_num_threads(1)
    try:
        written = 0
        for plan, f in zip(plans, files):
            if man.is_done(plan.name):
                f.status = "kept"
                report.kept.append(plan.name)
                advance(plan.bytes_in)
                continue
            hook = kill_after if written == kill_after else None
            rec = _write_file(ck, dst, plan, device, block, scale_fmt, advance, hook, pool, n_workers + 1)
            man.record(rec, kind="shard", tensors=len(plan.entries))
            f.status = "written"
            written += 1
        for rel in sidecars:
            if not man.is_done(rel):
                man.record(copy_file_atomic(src / rel, dst / rel, rel), kind="sidecar")
        # Index and config last: a folder that looks loadable is a finished one.
        if ck.layout == "hf-sharded":
            wmap = {name: p.name for p in plans for name, _, _ in p.entries}
            total = sum(nbytes(d, s) for p in plans for _, d, s in p.entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
            man.record(write_json_atomic(dst / INDEX_NAME, index), kind="index")
        man.record(write_json_atomic(dst / "config.json", _out_config(src, direction, mtp, extra)), kind="config")
        man.extra = extra
        man.finish()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(old_threads)
    report.seconds = time.perf_counter() - t0
    return report


def _finished_before(dst: Path, job: dict) -> set[str]:
    """Files an earlier run of the same job finished (size check only; the run re-checks hashes)."""
    m = read_manifest(dst)
    if not m or m.get("job") != job:
        return set()
    return {n for n, r in m.get("files", {}).items() if (dst / n).is_file() and (dst / n).stat().st_size == r["size"]}


def _out_config(src: Path, direction: str, mtp: str, extra: dict) -> dict:
    """The input's config.json (unknown keys kept) with the quantization and MTP settings of the output."""
    cfg = json.loads((src / "config.json").read_text())
    if direction == FP8_BF16:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = extra["quantization_config"]
    cfg["torch_dtype"] = "bfloat16"
    if "dtype" in cfg:
        cfg["dtype"] = "bfloat16"
    if mtp == "drop":
        cfg["num_nextn_predict_layers"] = 0
    return cfg


def _write_file(
    ck: Checkpoint,
    dst: Path,
    plan: _FilePlan,
    device: str,
    block: tuple[int, int],
    scale_fmt: str | None,
    advance: Progress,
    kill_hook: int | None,
    pool: ThreadPoolExecutor,
    depth: int,
):
    """Stream one output file: a reader thread fetches chunks, ``pool`` converts them (torch ops release the GIL),
    this thread hands results to the writer in order, whose threads hash and write. Every buffer handed on is fresh,
    so the stages overlap without copies."""
    w = SafetensorsWriter(dst / plan.name, plan.entries, {"format": "pt"}, background=True, direct=True)
    chunks = _prefetch(_read_chunks(ck, plan, device, block), depth=3)
    pending: deque = deque()  # (op, future or data, last, nbytes), in output order
    scales: list[torch.Tensor] = []
    n_out = 0

    def flush_one() -> None:
        nonlocal n_out, scales
        op, fut, last, nbytes = pending.popleft()
        res = fut.result() if isinstance(fut, Future) else fut
        name = op.info.name
        if op.kind == "quant":
            q, sc = res
            w.write_part(name, tensor_bytes(q))
            scales.append(sc)
            if last:
                w.write_part(N.scale_name(name), tensor_bytes(torch.cat(scales)))
                scales = []
        else:
            w.write_part(name, tensor_bytes(res))
        advance(nbytes)
        n_out += 1
        if kill_hook is not None and n_out == 1:
            time.sleep(0.5)  # let the writer put some bytes in the partial file first
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL, "KILL")))

    try:
        for op, x, s, last, nbytes in chunks:
            if op.kind == "copy":
                pending.append((op, x, last, nbytes))
            elif op.kind == "dequant":
                pending.append((op, pool.submit(_dequant, x, s, block, device), last, nbytes))
            else:
                pending.append((op, pool.submit(_quant, x, block, scale_fmt), last, nbytes))
            while len(pending) > depth:
                flush_one()
        while pending:
            flush_one()
        return w.finish()
    except BaseException:
        # Ctrl-C or an error: no partial file stays behind; finished files stay recorded in the manifest.
        for _, fut, _, _ in pending:
            if isinstance(fut, Future):
                fut.cancel()
        w.abort()
        raise
    finally:
        chunks.close()


def _read_chunks(ck: Checkpoint, plan: _FilePlan, device: str, block: tuple[int, int]) -> Iterator[tuple]:
    """(op, data, scale rows, last chunk of the tensor?, input bytes) in output order, bounded in size."""
    b0 = block[0]
    elems = GPU_CHUNK if device != "cpu" else CPU_CHUNK
    for op in plan.ops:
        info = op.info
        if op.kind == "copy":
            n = info.nbytes
            if n == 0:
                yield op, torch.empty(0, dtype=torch.uint8), None, True, 0
            for off in range(0, n, COPY_CHUNK):
                end = min(n, off + COPY_CHUNK)
                yield op, ck.read_bytes(info, off, end), None, end == n, end - off
            continue
        rows, cols = info.shape
        scale = ck.read_info(op.scale) if op.kind == "dequant" else None  # just the scale's bytes
        row_bytes = cols * DTYPE_SIZE[info.dtype]
        step = max(b0, (elems // max(cols, 1)) // b0 * b0)  # whole block rows, so that scale rows line up
        if rows == 0:
            yield op, ck.read_info(info), scale, True, 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = ck.read_bytes(info, r0 * row_bytes, r1 * row_bytes)
            x = raw.view(DTYPES[info.dtype]).view(r1 - r0, cols)
            s = scale[r0 // b0 : -(-r1 // b0)] if scale is not None else None
            extra = op.scale.nbytes if (scale is not None and r0 == 0) else 0
            yield op, x, s, r1 == rows, (r1 - r0) * row_bytes + extra


def _quant(x: torch.Tensor, block: tuple[int, int], scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    from dsv3_tools.kernels.cpu_dequant import quant_fp8

    return quant_fp8(x, block, scale_fmt)


def _dequant(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int], device: str) -> torch.Tensor:
    if device == "cpu":
        from dsv3_tools.kernels.cpu_dequant import dequant_fp8

        return dequant_fp8(x, s, block)
    kernel = _gpu_kernel(required=True)
    y = kernel(x.to(device, non_blocking=True), s.to(device), block)
    return y.cpu()


def _gpu_kernel(required: bool):
    """The Triton dequant wrapper, imported lazily (Triton is only needed on a GPU)."""
    try:
        from dsv3_tools.kernels.weight_dequant import weight_dequant
    except ImportError as e:
        if required:
            raise DeviceError(f"the GPU dequant kernel is unavailable ({e}); use --device cpu") from None
        return None
    return weight_dequant


def _prefetch(it: Iterator, depth: int) -> Iterator:
    """Run ``it`` on a helper thread, ``depth`` items ahead (reads release the GIL, so they overlap compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in it:
                if not put(("item", x)):
                    return
            put(("end", None))
        except BaseException as e:
            put(("error", e))

    t = threading.Thread(target=run, daemon=True, name="dsv3-read")
    t.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x
    finally:
        stop.set()
        t.join()  # a reader still inside torch at interpreter exit aborts the process (std::terminate)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
