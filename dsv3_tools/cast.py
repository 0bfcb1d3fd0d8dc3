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
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from . import names as N
from .checkpoint import Checkpoint, open_checkpoint
from .errors import CheckpointError, ConfigError, DeviceError, LayoutError, ScaleValueError
from .family import is_v4
from .layout import INDEX_NAME, ORIGIN_NAME
from .output import Output, OutputPlan, plan_output, sidecar_files
from .pipeline import ReadAhead
from .runtime import resolve_device
from .stfile import (
    DTYPE_SIZE,
    Entry,
    TensorInfo,
    header_entries,
    nbytes,
    parse_header,
    planned_size,
    read_header,
    torch_dtype,
)
from .writer import SafetensorsWriter, read_manifest, source_fingerprint, tensor_bytes

Progress = Callable[[int], None]
FP8_BF16 = "fp8-bf16"
BF16_FP8 = "bf16-fp8"
TO_BF16 = "to-bf16"  # DeepSeek-V4: FP8 and FP4 weights to BF16 (``cast fp8-bf16`` and ``cast to-bf16`` on V4)
FP4_FP8 = "fp4-fp8"  # DeepSeek-V4: FP4 experts to FP8
MTP_MODES = ("keep", "drop")
SCALE_FMTS = ("f32", "ue8m0")
COPY_CHUNK = 32 << 20  # bytes per read of a pass-through tensor
CPU_CHUNK = 4 << 20  # FP8 elements per dequant step on CPU (8 MB of BF16 out)
GPU_CHUNK = 64 << 20  # FP8 elements per kernel launch


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
    warnings: list[str] = field(default_factory=list)  # input metadata that is off but changes no tensor

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Op:
    """What one input tensor becomes. ``kind``: "copy"; "dequant" (block FP8 -> BF16; F32 or, DeepSeek-V4, E8M0
    scales); "quant" (BF16 -> block FP8); "scale" (a scale stored apart from its weight: computed from it);
    DeepSeek-V4's "dequant_fp4" (FP4 + 1x32 E8M0 -> BF16) and "fp4_fp8" (FP4 -> FP8 + 128x128 E8M0, exact or refused)."""

    kind: str
    info: TensorInfo  # the tensor read (for "scale": the BF16 weight it comes from)
    scale: TensorInfo | None = None  # dequant, FP4: the scale tensor; quant/scale: the original scale (fp8-bf16's)
    fmt: str | None = None  # quant/scale: the scale kind of fresh tiles (None: f32 amax / 448, or "ue8m0")
    scale_here: bool = True  # quant: the scale follows the weight in this file (else it is written where it was)
    scale_out: str | None = None  # fp4_fp8: the name of the new scale, written right after the weight


@dataclass
class FilePlan:
    name: str
    entries: list[Entry]
    ops: list[Op]
    bytes_in: int
    size: int
    header: bytes | None = None  # the original file's header, reproduced byte for byte (bf16-fp8 with an origin)


@dataclass
class CastPlan:
    """Everything a cast will do, decided (and checked) before any weight is read."""

    direction: str  # FP8_BF16 | BF16_FP8
    ck: Checkpoint = field(repr=False)
    files: list[FilePlan] = field(repr=False)
    output: OutputPlan
    device: str  # "cpu" or a CUDA device (fp8-bf16 only)
    workers: int | None  # CPU threads (None: all cores)
    mtp: str
    block: tuple[int, int]
    scale_fmt: str | None  # bf16-fp8: None (f32 scales) or "ue8m0"
    dropped: int  # MTP tensors left out (--mtp drop)
    extra: dict  # recorded in the manifest: which weights are FP8, the quantization config, the block
    config: dict  # the output's config.json

    @property
    def n_cast(self) -> int:
        return len(self.extra["fp8_weights"] if "fp8_weights" in self.extra else self.extra["converted"])

    def report(self, dry_run: bool = True) -> CastReport:
        files = [
            CastFile(p.name, len(p.entries), p.bytes_in, p.size, "kept" if p.name in self.output.done else "planned")
            for p in self.files
        ]
        return CastReport(
            self.direction, str(self.ck.path), str(self.output.dst), self.device, dry_run, files,
            self.output.sidecars, self.n_cast, sum(1 for p in self.files for op in p.ops if op.kind == "copy"),
            self.dropped, sum(p.bytes_in for p in self.files), sum(p.size for p in self.files), self.output.needed,
            self.output.free, scale_fmt=self.scale_fmt, warnings=list(self.ck.warnings),
        )  # fmt: skip


def plan_fp8_to_bf16(
    src: str | Path, dst: str | Path, *, device: str = "auto", workers: int | None = None, mtp: str = "keep"
) -> CastPlan:
    """Plan dequantizing the block-FP8 checkpoint folder ``src`` into a new BF16 folder ``dst``."""
    src, dst = Path(src), Path(dst)
    _check_mtp(mtp)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"--workers must be a positive number of threads, got {workers!r}")
    ck = _open_input(src)
    cfg = ck.config
    if not cfg.is_fp8:
        raise ConfigError(f"{src}: not an FP8 checkpoint (config.json has no quantization_config)")
    if is_v4(cfg):
        from .v4.cast import plan_v4_cast

        return plan_v4_cast(ck, dst, TO_BF16, device=device, workers=workers, mtp=mtp)
    dev = resolve_device(device, kernel=_gpu_kernel)
    block = cfg.block_size
    plans, dropped = _plan(ck, FP8_BF16, mtp=mtp, selected=set(), block=block)
    fp8_weights = sorted(op.info.name for p in plans for op in p.ops if op.kind == "dequant")
    qc = json.loads((src / "config.json").read_text()).get("quantization_config")
    extra = {"fp8_weights": fp8_weights, "quantization_config": qc, "block": list(block)}
    job = {"stage": "cast", "direction": FP8_BF16, "mtp": mtp}
    return finish_plan(ck, dst, FP8_BF16, plans, dropped, job, extra, dev, workers, mtp, block, None)


def plan_bf16_to_fp8(
    src: str | Path,
    dst: str | Path,
    *,
    scale_fmt: str | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    mtp: str = "keep",
) -> CastPlan:
    """Plan re-quantizing the BF16 checkpoint folder ``src`` to DeepSeek's block-FP8 format in a new folder ``dst``.

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
    if is_v4(cfg):
        raise ConfigError(f"{src}: cast bf16-fp8 re-quantizes V3-family checkpoints; DeepSeek-V4 is not supported yet")
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
    explicit = scale_fmt is not None
    if scale_fmt is None:
        scale_fmt = "ue8m0" if orig_qc.get("scale_fmt") == "ue8m0" else "f32"
    kinds = rextra.get("scale_kinds") or {} if origin == "manifest" else {}
    other = set(kinds.get("other") or ())

    def fmt_of(weight: str) -> str | None:
        """The scale kind of fresh tiles: --scale-fmt, else the original tensor's (V3.1: o_proj f32, the rest
        ue8m0), else the original checkpoint's."""
        if explicit or not kinds:
            kind = scale_fmt
        else:
            kind = kinds.get("default", scale_fmt)
            if weight in other:
                kind = "f32" if kind == "ue8m0" else "ue8m0"
        return None if kind == "f32" else kind

    selected = {n for n in wanted if n in ck.tensors and not any(fnmatch.fnmatchcase(n, p) for p in ignore)}
    for name in sorted(selected):
        info = ck.tensors[name]
        if len(info.shape) != 2 or info.dtype not in ("BF16", "F16", "F32"):
            raise ConfigError(
                f"tensor {name!r}: cannot quantize {info.dtype}{list(info.shape)} (listed by the {origin})"
            )
    # The original scales are reused where they reproduce a block exactly, unless --scale-fmt asks for fresh ones.
    prev = _read_origin(ck, block) if origin == "manifest" and not explicit else None
    plans = _plan_like_origin(ck, prev, selected, block, fmt_of) if prev is not None and mtp == "keep" else None
    dropped = 0
    if plans is None:
        plans, dropped = _plan(ck, BF16_FP8, mtp=mtp, selected=selected, block=block, prev=prev, fmt_of=fmt_of)
    fmt = None if scale_fmt == "f32" else scale_fmt
    job = {"stage": "cast", "direction": BF16_FP8, "mtp": mtp, "scale_fmt": scale_fmt, "ignore": sorted(ignore)}
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
    return finish_plan(ck, dst, BF16_FP8, plans, dropped, job, extra, "cpu", None, mtp, block, fmt)


def plan_fp4_to_fp8(
    src: str | Path, dst: str | Path, *, device: str = "auto", workers: int | None = None, mtp: str = "keep"
) -> CastPlan:
    """Plan re-encoding the FP4 routed experts of the DeepSeek-V4 folder ``src`` as FP8 with 128x128 E8M0 scales in a
    new folder ``dst`` (for GPUs without FP4 tensor cores), exactly: every expert scale is read first, and a block
    FP8 cannot hold exactly is refused, naming the tensor and the block, before anything is written."""
    src, dst = Path(src), Path(dst)
    _check_mtp(mtp)
    ck = _open_input(src)
    if not is_v4(ck.config):
        raise ConfigError(f"{src}: cast fp4-fp8 converts DeepSeek-V4's FP4 experts; this is {ck.config.model_type}")
    from .v4.cast import plan_v4_cast

    return plan_v4_cast(ck, dst, FP4_FP8, device=device, workers=workers, mtp=mtp)


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
    """Dequantize a block-FP8 checkpoint folder into a new BF16 folder ``dst`` (``dry_run``: the plan only)."""
    plan = plan_fp8_to_bf16(src, dst, device=device, workers=workers, mtp=mtp)
    plan.output.check_space()
    return plan.report() if dry_run else run_cast(plan, progress)


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
    """Re-quantize a BF16 checkpoint folder to block-FP8 in a new folder ``dst`` (see ``plan_bf16_to_fp8``)."""
    plan = plan_bf16_to_fp8(src, dst, scale_fmt=scale_fmt, ignore=ignore, mtp=mtp)
    plan.output.check_space()
    return plan.report() if dry_run else run_cast(plan, progress)


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
    ck: Checkpoint,
    direction: str,
    *,
    mtp: str,
    selected: set[str],
    block: tuple[int, int],
    prev: _Origin | None = None,
    fmt_of: Callable[[str], str | None] = lambda name: None,
) -> tuple[list[FilePlan], int]:
    """Output files (same names as the input's), their tensors in input byte order, and the work for each; a
    re-quantized weight's scale right after it."""
    plans: list[FilePlan] = []
    dropped = 0
    for rel in sorted(ck.files):
        entries: list[Entry] = []
        ops: list[Op] = []
        bytes_in = 0
        for info in sorted(ck.headers[rel].tensors.values(), key=lambda i: i.start):
            name = info.name
            if mtp == "drop" and N.is_mtp_name(ck.config, name):
                dropped += 1
                continue
            if direction == FP8_BF16:
                if N.is_scale(name):
                    continue  # consumed with its weight
                if info.dtype == "F8_E4M3":
                    sinfo = ck.tensors[N.scale_name(name)]  # presence and shape checked by open_checkpoint
                    entries.append((name, "BF16", info.shape))
                    ops.append(Op("dequant", info, sinfo))
                    bytes_in += info.nbytes + sinfo.nbytes
                    continue
            elif name in selected:
                grid = tuple(-(-d // b) for d, b in zip(info.shape, block))
                entries += [(name, "F8_E4M3", info.shape), (N.scale_name(name), "F32", grid)]
                ops.append(Op("quant", info, prev.scale(name, grid) if prev else None, fmt_of(name)))
                bytes_in += info.nbytes
                continue
            entries.append((name, info.dtype, info.shape))
            ops.append(Op("copy", info))
            bytes_in += info.nbytes
        if entries:
            plans.append(FilePlan(rel, entries, ops, bytes_in, planned_size(entries, {"format": "pt"})))
    return plans, dropped


# ---------------------------------------------------------------------- what an FP8 original was (ORIGIN_NAME)
HEADER_PREFIX = "__header__/"  # the origin file's tensors holding each original data file's header bytes


@dataclass
class _Origin:
    """The FP8 original as ``cast fp8-bf16`` kept it: every block scale, and each data file's header bytes."""

    scales: dict[str, TensorInfo]  # HF scale name -> where it is in the origin file
    headers: dict[str, bytes]  # original data file -> its header (length prefix included)

    def scale(self, weight: str, grid: tuple[int, ...]) -> TensorInfo | None:
        info = self.scales.get(N.scale_name(weight))
        return info if info is not None and info.shape == grid and info.dtype == "F32" else None


def _read_origin(ck: Checkpoint, block: tuple[int, int]) -> _Origin | None:
    """The origin file of a BF16 folder written by ``cast fp8-bf16`` (None when absent; a warning when unusable)."""
    path = ck.path / ORIGIN_NAME
    if not path.is_file():
        return None
    try:
        h = read_header(path, ORIGIN_NAME)
    except CheckpointError as e:
        ck.warnings.append(f"{ORIGIN_NAME} is unreadable ({e.detail}): weights get fresh scales")
        return None
    scales = {n: i for n, i in h.tensors.items() if not n.startswith(HEADER_PREFIX)}
    headers = {
        n.removeprefix(HEADER_PREFIX): ck.read_bytes(i).numpy().tobytes()
        for n, i in h.tensors.items()
        if n.startswith(HEADER_PREFIX)
    }
    return _Origin(scales, headers)


def _plan_like_origin(
    ck: Checkpoint,
    origin: _Origin,
    selected: set[str],
    block: tuple[int, int],
    fmt_of: Callable[[str], str | None],
) -> list[FilePlan] | None:
    """The original FP8 files again: same names, same tensors in the same order (a scale where it was, also in
    another file than its weight), the original header bytes. None when the BF16 folder no longer matches them
    (tensors added, removed, reshaped, or not all of the original FP8 weights re-quantized)."""
    files: dict[str, list[Entry]] = {}
    for rel, hb in sorted(origin.headers.items()):
        try:
            files[rel] = header_entries(parse_header(hb[8:], None, rel))
        except CheckpointError:
            return None
    original = {n: (d, s) for entries in files.values() for n, d, s in entries}
    weights = {n for n in original if not N.is_scale(n)}
    if weights != set(ck.tensors):
        return None
    for n in weights:
        d, s = original[n]
        info = ck.tensors[n]
        if info.shape != s or (d == "F8_E4M3") != (n in selected) or (d != "F8_E4M3" and d != info.dtype):
            return None
        if d == "F8_E4M3" and original.get(N.scale_name(n)) != ("F32", _grid(s, block)):
            return None
    plans = []
    for rel, entries in files.items():
        ops: list[Op] = []
        bytes_in = 0
        for i, (name, _, _) in enumerate(entries):
            if N.is_scale(name):
                w = N.weight_of(name)
                if i and entries[i - 1][0] == w:
                    continue  # written right after its weight
                info = ck.tensors[w]
                ops.append(Op("scale", info, origin.scale(w, _grid(info.shape, block)), fmt_of(w)))
            elif name in selected:
                info = ck.tensors[name]
                here = i + 1 < len(entries) and entries[i + 1][0] == N.scale_name(name)
                ops.append(Op("quant", info, origin.scale(name, _grid(info.shape, block)), fmt_of(name), here))
            else:
                info = ck.tensors[name]
                ops.append(Op("copy", info))
            bytes_in += info.nbytes
        hb = origin.headers[rel]
        plans.append(FilePlan(rel, entries, ops, bytes_in, len(hb) + sum(nbytes(d, s) for _, d, s in entries), hb))
    return plans


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return tuple(-(-d // b) for d, b in zip(shape, block))


def _write_origin(plan: CastPlan, out: Output) -> dict:
    """Keep what the FP8 original was beside the BF16 output: every block scale and each data file's header (about
    1/4000 of the BF16 bytes), so that ``cast bf16-fp8`` gives back the original bytes. Returns each weight's scale
    kind: ``ue8m0`` when every scale is a power of two, else ``f32`` (V3.1 stores o_proj's apart)."""
    import torch

    ck = plan.ck
    scales = [(op.scale.name, op.scale) for fp in plan.files for op in fp.ops if op.kind == "dequant"]
    kinds: dict[str, str] = {}
    for name, info in scales:
        s = ck.read_info(info).float()
        m, _ = torch.frexp(s)
        kinds[N.weight_of(name)] = "ue8m0" if bool(((m == 0.5) & (s > 0)).all()) else "f32"
    if not out.is_done(ORIGIN_NAME):
        headers = {
            HEADER_PREFIX + rel: ck.read_bytes(TensorInfo(rel, rel, "U8", (h.data_start,), 0, h.data_start))
            for rel, h in sorted(ck.headers.items())
        }
        entries = [(n, i.dtype, i.shape) for n, i in scales] + [(n, "U8", (len(b),)) for n, b in headers.items()]
        w = SafetensorsWriter(out.plan.dst / ORIGIN_NAME, entries, {"format": "pt", "dsv3_fp8_origin": "1"})
        try:
            for n, info in scales:
                w.write_raw(n, memoryview(ck.read_bytes(info).numpy()))
            for n, b in headers.items():
                w.write_raw(n, memoryview(b.numpy()))
            out.record(w.finish(), kind="origin")
        except BaseException:
            w.abort()
            raise
    counts = {k: sum(v == k for v in kinds.values()) for k in SCALE_FMTS}
    default = max(SCALE_FMTS, key=lambda k: counts[k])
    return {"default": default, "other": sorted(n for n, k in kinds.items() if k != default)}


def finish_plan(
    ck: Checkpoint,
    dst: Path,
    direction: str,
    files: list[FilePlan],
    dropped: int,
    job: dict,
    extra: dict,
    device: str,
    workers: int | None,
    mtp: str,
    block: tuple[int, int],
    scale_fmt: str | None,
    config: dict | None = None,
) -> CastPlan:
    """The output side of a cast plan: the same file names as the input's, its sidecars, config (``config``, or the
    input's with the quantization and MTP settings of a V3-family cast) and index last."""
    src = ck.path
    sidecars = sidecar_files(src)
    job = job | {"source": source_fingerprint(src, [*ck.files, "config.json", *sidecars])}
    out = plan_output(src, dst, job, {p.name: p.size for p in files}, sidecars)
    config = config if config is not None else _out_config(src, direction, mtp, extra)
    return CastPlan(direction, ck, files, out, device, workers, mtp, block, scale_fmt, dropped, extra, config)


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


# ---------------------------------------------------------------------- running
def run_cast(plan: CastPlan, progress: Progress | None = None) -> CastReport:
    """Write ``plan``'s output folder (resuming an interrupted run of the same cast); ``progress(n)`` gets the input
    bytes consumed."""
    import torch

    t0 = time.perf_counter()
    report = plan.report(dry_run=False)
    out = Output(plan.output)
    advance = progress or (lambda n: None)
    # Parallelism comes from a pool of threads each running single-threaded torch ops on its own chunk: on a
    # busy machine, torch's intra-op pool (a barrier per op) was measured 10-100x slower than this.
    old_threads = torch.get_num_threads()
    n_workers = 1 if plan.device != "cpu" else max(1, plan.workers or os.cpu_count() or 1)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="dsv3-cast")
    torch.set_num_threads(1)
    held: dict[str, torch.Tensor] = {}  # scales stored apart from their weight (bf16-fp8 in the original layout)
    try:
        for fp, f in zip(plan.files, report.files):
            if out.is_done(fp.name):
                f.status = "kept"
                report.kept.append(fp.name)
                advance(fp.bytes_in)
                continue
            rec = _write_file(plan, fp, advance, pool, n_workers + 1, held)
            out.record(rec, kind="shard", tensors=len(fp.entries))
            f.status = "written"
        if plan.direction == FP8_BF16:
            plan.extra["scale_kinds"] = _write_origin(plan, out)
        json_files: dict[str, object] = {}
        if plan.ck.layout == "hf-sharded":
            wmap = {name: p.name for p in plan.files for name, _, _ in p.entries}
            total = sum(nbytes(d, s) for p in plan.files for _, d, s in p.entries)
            json_files[INDEX_NAME] = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        json_files["config.json"] = plan.config
        out.finish(json_files, plan.extra)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(old_threads)
        out.lock.release()
    report.seconds = time.perf_counter() - t0
    return report


def _write_file(
    plan: CastPlan,
    fp: FilePlan,
    advance: Progress,
    pool: ThreadPoolExecutor,
    depth: int,
    held: dict[str, torch.Tensor],
):
    """Stream one output file: a reader thread fetches chunks, ``pool`` converts them (torch ops release the GIL),
    this thread hands results to the writer in order, whose threads hash and write. Every buffer handed on is fresh,
    so the stages overlap without copies. ``held``: scales written in another file than their weight's."""
    import torch

    from .v4.cast import convert_fp4  # (here: v4.cast builds on this module)

    w = SafetensorsWriter(
        plan.output.dst / fp.name, fp.entries, {"format": "pt"}, background=True, direct=True, header=fp.header
    )
    chunks = ReadAhead(_read_chunks(plan.ck, fp, plan.device, plan.block), depth=3, name="dsv3-read")
    pending: deque = deque()  # (op, future or data, last, nbytes), in output order
    scales: list[torch.Tensor] = []
    block, device = plan.block, plan.device

    def flush_one() -> None:

        nonlocal scales
        op, fut, last, nbytes = pending.popleft()
        res = fut.result() if isinstance(fut, Future) else fut
        name = op.info.name
        if op.kind in ("quant", "scale", "fp4_fp8"):  # a weight (but "scale"), then its new scales after its last chunk
            q, sc = res
            if op.kind != "scale":
                w.write_part(name, tensor_bytes(q))
            scales.append(sc)
            if last:
                s = torch.cat(scales)
                scales = []
                sname = op.scale_out or N.scale_name(name)
                if op.kind == "scale" or op.scale_here:
                    w.write_part(sname, tensor_bytes(s))
                if sname in held and not torch.equal(held[sname], s):
                    raise AssertionError(f"{sname}: computed twice with different values")
                if op.kind == "scale" or not op.scale_here:
                    held[sname] = s
        else:
            w.write_part(name, tensor_bytes(res))
        advance(nbytes)

    try:
        for op, x, s, r0, last, nbytes in chunks:
            if op.kind == "copy":
                pending.append((op, x, last, nbytes))
            elif op.kind == "dequant":
                pending.append((op, pool.submit(_dequant, x, s, block, device), last, nbytes))
            elif op.kind in ("dequant_fp4", "fp4_fp8"):  # DeepSeek-V4's FP4 experts
                pending.append((op, pool.submit(convert_fp4, op, x, s, r0), last, nbytes))
            else:  # quant, scale: s holds the original scales of these rows, when kept
                pending.append((op, pool.submit(_quant, x, block, op.fmt, s), last, nbytes))
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
        chunks.close()  # stops the reader and waits for it


def _read_chunks(ck: Checkpoint, plan: FilePlan, device: str, block: tuple[int, int]) -> Iterator[tuple]:
    """(op, data, scale rows, first row, last chunk of the tensor?, input bytes) in output order, bounded in size."""
    import torch

    b0 = block[0]
    elems = GPU_CHUNK if device != "cpu" else CPU_CHUNK
    for op in plan.ops:
        info = op.info
        if op.kind == "copy":
            n = info.nbytes
            if n == 0:
                yield op, torch.empty(0, dtype=torch.uint8), None, 0, True, 0
            for off in range(0, n, COPY_CHUNK):
                end = min(n, off + COPY_CHUNK)
                yield op, ck.read_bytes(info, off, end), None, 0, end == n, end - off
            continue
        rows, cols = info.shape
        scale = ck.read_info(op.scale) if op.scale is not None else None  # just the scale's bytes
        if scale is not None and op.kind == "dequant" and op.scale.dtype == "F8_E8M0":
            scale = _e8m0_scales(scale, info.name, op.scale.file)
        fp4 = op.kind in ("dequant_fp4", "fp4_fp8")
        per = 1 if fp4 else b0  # weight rows per scale row: 1x32 groups (FP4), or blocks
        row_bytes = cols * DTYPE_SIZE[info.dtype]
        step = max(b0, (elems // max(cols, 1)) // b0 * b0)  # whole block rows, so that scale rows line up
        if rows == 0:
            yield op, ck.read_info(info), scale, 0, True, 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = ck.read_bytes(info, r0 * row_bytes, r1 * row_bytes)
            x = raw.view(torch_dtype(info.dtype)).view(r1 - r0, cols)
            s = scale[r0 // per : -(-r1 // per)] if scale is not None else None
            extra = op.scale.nbytes if ((op.kind == "dequant" or fp4) and r0 == 0) else 0
            yield op, x, s, r0, r1 == rows, (r1 - r0) * row_bytes + extra


def _e8m0_scales(scale: torch.Tensor, name: str, file: str) -> torch.Tensor:
    """F32 of a DeepSeek-V4 weight's E8M0 block scales (exact); a NaN byte is an error, not a NaN weight."""
    import torch

    from dsv3_tools.kernels.fp4 import E8M0_NAN, e8m0_to_f32

    nan = scale.view(torch.uint8) == E8M0_NAN
    if bool(nan.any()):
        raise ScaleValueError(f"E8M0 scale block {nan.nonzero()[0].tolist()} is NaN (byte 255)", file=file, tensor=name)
    return e8m0_to_f32(scale)


def _quant(
    x: torch.Tensor, block: tuple[int, int], scale_fmt: str | None, prev: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from dsv3_tools.kernels.cpu_dequant import quant_fp8

    return quant_fp8(x, block, scale_fmt, prev)


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
