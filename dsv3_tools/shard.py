"""``shard``: stream a Hugging Face checkpoint into the official model-parallel layout, in bounded memory.

Output (``DST``): ``model{r}-mp{N}.safetensors`` for r = 0..N-1 with the keys and shapes the DeepSeek inference
demo loads with strict matching: names renamed by the name table (``names.py``), tensors split on the table's dim
with FP8 scales split alongside, routed experts partitioned in contiguous blocks (rank r owns experts
``[r*E/N, (r+1)*E/N)`` whole; others are absent), replicated tensors byte-identical in every rank file. Beside
them: ``config.json``, the source's Hugging Face config (byte for byte, or with ``num_nextn_predict_layers: 0``
when the MTP module is dropped: transformers' ``AutoTokenizer``, which the demo calls on the folder, reads it),
``model_args.json`` holding the demo's ``ModelArgs`` (its ``--config``), the tokenizer and generation config, and
``dsv3-manifest.json`` with checksums. So the upstream demo runs on the folder as it is (``layout.upstream_command``).

Before anything is written, N is checked against every tensor (experts, heads and vocab divisible by N, every
split dim divisible, and for FP8 every split on a block boundary); the error names the first offending tensor
and the degrees that would work.

MTP (``--mtp keep``, the default; ``drop`` leaves it out): layer ``L = num_hidden_layers`` (and following) is written
under the same rules into ``mtp{r}-mp{N}.safetensors`` beside each rank file (the demo loads its rank files strictly
and has no MTP layer), with these extra names:

- ``layers.{L}.embed.weight``: its token embedding, split on vocab rows like ``embed``;
- ``layers.{L}.enorm.weight``, ``layers.{L}.hnorm.weight``: the two RMSNorms, replicated;
- ``layers.{L}.eh_proj.weight``: the [H, 2H] projection, replicated;
- ``layers.{L}.shared_head.norm.weight`` (replicated) and ``layers.{L}.shared_head.head.weight`` (vocab rows);
- ``layers.{L}.attn_norm``, ``attn.*``, ``ffn_norm``, ``ffn.*``: its decoder block, named and split as any layer.

DeepSeek-V4 has its own layout (its names are the demo's, the MTP module stays in the rank files, ``wo_a`` becomes
BF16, FP4 experts are written as ``F4``): ``plan_shard`` dispatches to ``v4/shard.py`` for the plan, and this module
writes it (``finish_plan``, ``run_shard``).

Streaming: every rank file's header is planned from the input headers first; the input tensors are then read
once each, in file order, in chunks of at most ``CHUNK`` bytes, and each chunk's slices are appended to the rank
files, whose tensor order is that same input order, so every writer advances sequentially. Memory is a few
chunks, independent of the checkpoint's size, the largest tensor and N.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from . import names as N
from .checkpoint import Checkpoint, open_checkpoint
from .config import ModelConfig
from .errors import ConfigError, ShardingError
from .family import is_v4
from .layout import MODEL_ARGS_NAME, MP_MTP_RE, MP_RE, mtp_rank_file, rank_file, upstream_command
from .modelargs import demo_model_args
from .output import MP_SIDECAR_PATTERNS, Output, OutputPlan, check_separate, plan_output, sidecar_files
from .pipeline import BufferRing, Stopped, WriteBehind, first_error
from .stfile import Entry, TensorInfo, planned_size
from .writer import SafetensorsWriter, source_fingerprint

Progress = Callable[[int], None]
CHUNK = 32 << 20  # bytes per read (two in flight): bounds memory whatever the tensor size
BLOCK = 128  # the FP8 block of a weight dequantized on the way (DeepSeek-V4's wo_a)
MTP_MODES = ("keep", "drop")


# ---------------------------------------------------------------------- reports
@dataclass
class ShardFile:
    name: str
    rank: int
    tensors: int
    bytes: int
    status: str  # "planned" (dry run), "written", "kept" (finished by an earlier run, checksum verified)


@dataclass
class ShardReport:
    src: str
    dst: str
    mp: int
    mtp: str
    dtype: str  # "fp8" or "bf16"
    dry_run: bool
    files: list[ShardFile]
    sidecars: list[str]
    tensors_in: int
    tensors_mtp_dropped: int
    bytes_read: int  # tensor bytes read from SRC (planned, in a dry run)
    bytes_written: int  # rank-file bytes written by this run (planned, in a dry run)
    bytes_needed: int  # free space this run needs in DST
    free_bytes: int
    fits: bool
    valid_mp: list[int]
    seconds: float = 0.0
    model_args: dict = field(default_factory=dict)
    upstream_command: str = ""  # the upstream demo's command line for this folder
    warnings: list[str] = field(default_factory=list)  # input metadata that is off but changes no tensor

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the degree check
@dataclass(frozen=True)
class Rule:
    """One divisibility constraint on N, attributed to the first tensor that imposes it."""

    tensor: str
    what: str  # "n_routed_experts", "num_attention_heads", "dim 0 of size", "dim 1 of size"
    size: int  # must be divisible by N ...
    unit: int  # ... into pieces that are a multiple of this (the FP8 block on a quantized split dim, else 1)

    def violated(self, n: int) -> str | None:
        if self.size % n:
            return f"{self.what} {self.size} is not divisible by {n}"
        if (self.size // n) % self.unit:
            return (
                f"{self.what} {self.size} would split into pieces of {self.size // n}, "
                f"not on {self.unit}-wide FP8 block boundaries (its scale cannot be split alongside)"
            )
        return None


def _rules(cfg: ModelConfig, tensors: list[tuple[str, tuple[int, ...], bool]]) -> list[Rule]:
    """The constraints ``(hf name, shape, block-quantized)`` tensors put on N, deduplicated, in tensor order."""
    block = cfg.block_size
    rules: dict[tuple[str, int, int], Rule] = {}

    def add(r: Rule) -> None:
        rules.setdefault((r.what, r.size, r.unit), r)

    for name, shape, quantized in tensors:
        n = N.parse_hf(name)
        if n.split == N.EXPERT:
            add(Rule(name, "n_routed_experts", cfg.n_routed_experts, 1))
        elif isinstance(n.split, int):
            if n.module.hf.startswith("self_attn."):
                add(Rule(name, "num_attention_heads", cfg.num_attention_heads, 1))
            unit = block[n.split] if quantized and not n.is_scale else 1
            add(Rule(name, f"dim {n.split} of size", shape[n.split], unit))
    return list(rules.values())


def degrees(rules: list[Rule]) -> list[int]:
    limit = min((r.size for r in rules), default=1)
    return [n for n in range(1, max(limit, 1) + 1) if all(r.violated(n) is None for r in rules)]


def check_degree(rules: list[Rule], mp: int) -> None:
    for r in rules:
        why = r.violated(mp)
        if why:
            ok = ", ".join(map(str, degrees(rules)))
            raise ShardingError(f"cannot shard into --mp {mp}: tensor {r.tensor!r}: {why}; degrees that work: {ok}")


def valid_mp_degrees(cfg: ModelConfig, fp8: bool) -> list[int]:
    """Every model-parallel degree a checkpoint of ``cfg`` can be sharded into (``fp8``: block-quantized)."""
    # Every layer of a kind (dense, MoE, MTP) has the same shapes: one of each gives the same rules, faster.
    cfg = cfg.with_layers(min(cfg.num_hidden_layers, cfg.first_k_dense_replace + 1))
    tensors = []
    for spec in N.expected_tensors(cfg, mtp=True).values():
        n = N.parse_hf(spec.name)
        if n.is_scale and not fp8:
            continue
        tensors.append((spec.name, spec.shape, fp8 and n.module.quantized))
    return degrees(_rules(cfg, tensors))


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Item:
    """One input tensor and where its pieces go."""

    info: TensorInfo
    mp: str  # its name in the rank files
    split: int | str | None  # 0 / 1: the dim cut across ranks; N.EXPERT or None: whole
    ranks: tuple[int, ...]  # ranks holding a piece (all for split/replicated; the owner for an expert)
    shape: tuple[int, ...]  # the per-rank shape
    dtype: str  # the rank files' dtype (the input's, unless converted or relabelled)
    mtp: bool = False  # part of the MTP module: goes to the ranks' mtp{r}-mp{N} files
    scale: TensorInfo | None = None  # dequant: the block scales of this FP8 weight, split alongside and dropped

    def files(self, mp: int) -> list[str]:
        """The output file of each rank in ``ranks``, in that order."""
        name = mtp_rank_file if self.mtp else rank_file
        return [name(r, mp) for r in self.ranks]


def _plan(ck: Checkpoint, cfg: ModelConfig, mp: int, keep_mtp: bool) -> tuple[list[Item], int]:
    """Input tensors in read order (file, then offset) with their destinations; and how many MTP tensors drop."""
    order = {f: i for i, f in enumerate(sorted(ck.files))}  # file-name order: model-00001-of-... first
    items: list[Item] = []
    dropped = 0
    per = cfg.n_routed_experts // mp if cfg.n_routed_experts % mp == 0 else 0
    for info in sorted(ck.tensors.values(), key=lambda i: (order[i.file], i.start)):
        n = N.parse_hf(info.name)
        mtp = n.layer is not None and cfg.is_mtp_layer(n.layer)
        if mtp and not keep_mtp:
            dropped += 1
            continue
        if n.split == N.EXPERT:
            ranks: tuple[int, ...] = (n.expert // per,) if per else (0,)
            shape = info.shape
        elif isinstance(n.split, int):
            ranks = tuple(range(mp))
            shape = tuple(s // mp if d == n.split else s for d, s in enumerate(info.shape))
        else:
            ranks = tuple(range(mp))
            shape = info.shape
        items.append(Item(info, n.mp, n.split, ranks, shape, info.dtype, mtp))
    return items, dropped


# ---------------------------------------------------------------------- the stage
@dataclass
class ShardPlan:
    """Everything a shard run will do, decided (and checked) before any weight is read."""

    ck: Checkpoint = field(repr=False)
    mp: int
    mtp: str
    dtype: str  # "fp8" or "bf16"
    items: list[Item] = field(repr=False)  # input tensors in read order, with their destinations
    entries: dict[str, list[Entry]] = field(repr=False)  # per output file: its tensors, in writing order
    sizes: dict[str, int]  # output file -> size (rank files first, then the MTP module's)
    dropped: int  # MTP tensors left out
    valid: list[int]  # every degree this checkpoint can be sharded into
    model_args: dict  # the demo's ModelArgs, written as model_args.json
    config: dict | None  # the HF config.json when it differs from the source's (MTP dropped); None: copied as is
    output: OutputPlan

    def report(self, dry_run: bool = True) -> ShardReport:
        pending = {n for n in self.sizes if n not in self.output.done}
        files = [
            ShardFile(n, _rank_of(n), len(self.entries[n]), size, "planned" if n in pending else "kept")
            for n, size in self.sizes.items()
        ]
        read = sum(it.info.nbytes for it in self.items if pending.intersection(it.files(self.mp)))
        return ShardReport(
            str(self.ck.path), str(self.output.dst), self.mp, self.mtp, self.dtype, dry_run, files,
            self.output.sidecars, len(self.ck.tensors), self.dropped, read, sum(self.sizes[n] for n in pending),
            self.output.needed, self.output.free, self.output.fits, self.valid, 0.0, self.model_args,
            upstream_command(self.output.dst, self.mp), list(self.ck.warnings),
        )  # fmt: skip


def _rank_of(name: str) -> int:
    m = MP_RE.match(name) or MP_MTP_RE.match(name)
    return int(m.group(1))


def plan_shard(src: str | Path, dst: str | Path, *, mp: int, mtp: str = "keep") -> ShardPlan:
    """Plan the model-parallel layout of the HF checkpoint ``src`` for ``mp`` ranks in the new folder ``dst``: N is
    checked against every tensor, and ``dst`` against the job (see ``output.plan_output``)."""
    src, dst = Path(src), Path(dst)
    check_separate(src, dst)
    if mtp not in MTP_MODES:
        raise ShardingError(f"--mtp must be 'drop' or 'keep', got {mtp!r}")
    if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
        raise ShardingError(f"--mp must be a positive integer, got {mp!r}")
    ck = open_checkpoint(src)
    if ck.layout == "mp":
        raise ShardingError(f"{src} is already in the model-parallel layout; shard a Hugging Face checkpoint")
    cfg = ck.config
    if cfg is None:
        raise ConfigError(f"{src}: no config.json")
    if is_v4(cfg):
        from .v4.shard import plan_v4_shard

        return plan_v4_shard(ck, dst, mp, mtp)
    fp8 = any(i.dtype == "F8_E4M3" for i in ck.tensors.values())
    items, dropped = _plan(ck, cfg, mp, mtp == "keep")
    rules = _rules(
        cfg,
        [
            (it.info.name, it.info.shape, fp8 and (it.info.dtype == "F8_E4M3" or N.is_scale(it.info.name)))
            for it in items
        ],
    )
    check_degree(rules, mp)

    dtype = "fp8" if fp8 else "bf16"
    return finish_plan(ck, dst, mp, mtp, dtype, items, dropped, degrees(rules), demo_model_args(cfg))


def finish_plan(
    ck: Checkpoint,
    dst: Path,
    mp: int,
    mtp: str,
    dtype: str,
    items: list[Item],
    dropped: int,
    valid: list[int],
    model_args: dict,
) -> ShardPlan:
    """The rank files' contents and sizes from ``items``, and the destination checked (``output.plan_output``)."""
    entries: dict[str, list[Entry]] = {rank_file(r, mp): [] for r in range(mp)}
    for it in items:
        for f in it.files(mp):
            entries.setdefault(f, []).append((it.mp, it.dtype, it.shape))
    sizes = {f: planned_size(e, {"format": "pt"}) for f, e in entries.items()}
    src = ck.path
    job = {"stage": "shard", "mp": mp, "mtp": mtp, "source": source_fingerprint(src, [*ck.files, "config.json"])}
    config = None
    if dropped:  # the HF config must say what the folder holds: no MTP layer
        config = json.loads((src / "config.json").read_text()) | {"num_nextn_predict_layers": 0}
    copies = {} if config is not None else {"config.json": "config.json"}
    out = plan_output(src, dst, job, sizes, sidecar_files(src, MP_SIDECAR_PATTERNS), copies)
    return ShardPlan(ck, mp, mtp, dtype, items, entries, sizes, dropped, valid, model_args, config, out)


def run_shard(plan: ShardPlan, progress: Progress | None = None) -> ShardReport:
    """Write ``plan``'s rank files (resuming an interrupted run of the same job); ``progress(n)`` gets the rank-file
    bytes as they are written."""
    t0 = time.monotonic()
    ck = plan.ck
    try:
        with Output(plan.output) as out:
            pending = [n for n in plan.sizes if not out.is_done(n)]
            read, written = _write_files(plan, pending, out, progress or (lambda n: None))
            cfg = ck.config
            extra = {
                "mp": plan.mp,
                "mtp": plan.mtp,
                "dtype": plan.dtype,
                "experts_per_rank": cfg.n_routed_experts // plan.mp,
            }
            json_files = {MODEL_ARGS_NAME: plan.model_args} | ({"config.json": plan.config} if plan.config else {})
            out.finish(json_files, extra)
    finally:
        ck.close()
    rep = plan.report(dry_run=False)
    for f in rep.files:
        f.status = "written" if f.name in pending else "kept"
    rep.bytes_read, rep.bytes_written, rep.seconds = read, written, round(time.monotonic() - t0, 3)
    return rep


def shard_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    mp: int,
    mtp: str = "keep",
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ShardReport:
    """Write the model-parallel layout of the HF checkpoint ``src`` for ``mp`` ranks into the new folder ``dst``
    (``dry_run``: the plan only).

    Resumes a run interrupted with the same arguments (finished rank files whose checksum still matches are
    kept). ``progress`` receives the number of rank-file bytes written as they are written.
    """
    plan = plan_shard(src, dst, mp=mp, mtp=mtp)
    if dry_run:
        plan.ck.close()
        return plan.report()
    return run_shard(plan, progress)


def _write_files(plan: ShardPlan, pending: list[str], out: Output, advance: Progress) -> tuple[int, int]:
    """Stream every input tensor once into the pending output files; return (bytes read, bytes written)."""
    writers: dict[str, SafetensorsWriter] = {}
    pipe: _Pipe | None = None
    try:
        for f in pending:
            writers[f] = SafetensorsWriter(plan.output.dst / f, plan.entries[f], {"format": "pt"})
            advance(writers[f].data_start)  # the header: the bar's total is the files' whole size
        # a read holds at least one row (one 128-row block of a weight dequantized on the way)
        rows = [
            it.info.nbytes // it.info.shape[0] * (BLOCK if it.scale is not None else 1)
            for it in plan.items
            if it.info.shape and it.info.shape[0]
        ]
        pipe = _Pipe(plan.ck, writers, plan.mp, max(CHUNK, *rows, 1), advance)
        for it in plan.items:
            if any(f in writers for f in it.files(plan.mp)):
                pipe.copy(it)
        pipe.close()
        for f in pending:  # record each as soon as it is complete: a kill from here on loses less
            out.record(writers[f].finish(), rank=_rank_of(f), world=plan.mp, tensors=len(plan.entries[f]))
    except BaseException:
        # Ctrl-C or an error: stop the workers, leave no partial files; finished outputs stay recorded.
        if pipe is not None:
            pipe.abort()
        for w in writers.values():
            w.abort()
        raise
    return pipe.read, sum(w.size for w in writers.values())


class _Pipe:
    """Reads input chunks in the calling thread and hands them to one ``WriteBehind`` worker per output file.

    Chunk k+1 is read while chunk k is written and hashed (file writes and sha256 release the GIL), so the
    run approaches the read+write floor. Two read buffers alternate (a ``BufferRing``); a buffer is reused only
    after every writer is done with it. A file's worker is serial, so the file still receives bytes in planned order.
    """

    def __init__(
        self, ck: Checkpoint, writers: dict[str, SafetensorsWriter], mp: int, size: int, advance: Progress
    ) -> None:
        import torch

        self.ck, self.writers, self.mp, self.advance = ck, writers, mp, advance
        self.stop = threading.Event()
        self.ring = BufferRing([torch.empty(size, dtype=torch.uint8) for _ in range(2)], self.stop)
        self.workers = {f: WriteBehind(self._job, depth=4, name=f"dsv3-shard-{f}", stop=self.stop) for f in writers}
        self.gather = {f: torch.empty(size // mp + 1, dtype=torch.uint8) for f in writers}  # split-1 pieces
        self.read = 0

    def _job(self, job: tuple) -> None:
        fn, args, slot = job
        try:
            fn(*args)
        finally:
            if slot is not None:
                self.ring.release(slot)

    def _check(self) -> None:
        err = first_error(self.workers.values())
        if err is not None:
            raise err

    def _take(self, users: int) -> tuple[int, torch.Tensor]:
        try:
            return self.ring.take(users)
        except Stopped:
            self._check()
            raise

    def _send(self, f: str, slot: int | None, fn: Callable, *args: object) -> None:
        try:
            self.workers[f].put((fn, args, slot))
        except Stopped:
            self._check()
            raise

    def copy(self, it: Item) -> None:
        """Queue one input tensor's pieces for its target files, a chunk at a time."""
        info, name, mp = it.info, it.mp, self.mp
        targets = [(f, r) for f, r in zip(it.files(mp), it.ranks) if f in self.writers]
        nbytes = info.nbytes
        if nbytes == 0:
            for f, _ in targets:
                self._send(f, None, self.writers[f].write_raw, name, memoryview(b""))
            return
        if it.scale is not None:
            self._dequant(it, targets)
        elif it.split == 0:
            part = nbytes // mp  # rank r's rows are one contiguous byte range of the input
            for f, r in targets:
                self._stream(info, name, r * part, (r + 1) * part, [f])
        elif it.split == 1:
            assert len(info.shape) == 2, info
            row = nbytes // info.shape[0]
            step = max(1, self.ring.buffers[0].numel() // row)
            for r0 in range(0, info.shape[0], step):
                r1 = min(info.shape[0], r0 + step)
                slot, buf = self._take(len(targets))
                chunk = self.ck.read_bytes(info, r0 * row, r1 * row, out=buf).view(r1 - r0, mp, row // mp)
                self.read += (r1 - r0) * row
                for f, r in targets:
                    self._send(f, slot, self._gather_write, f, r, name, chunk)
                    self.advance((r1 - r0) * (row // mp))
        else:  # replicated, or a whole expert: the same bytes to every target
            self._stream(info, name, 0, nbytes, [f for f, _ in targets])

    def _dequant(self, it: Item, targets: list[tuple[str, int]]) -> None:
        """An FP8 weight split on dim 0 and written as BF16 (DeepSeek-V4's ``wo_a``): each rank's rows are read in
        whole 128-row blocks and dequantized with their scale rows on that rank's writer thread."""
        from dsv3_tools.kernels.fp4 import e8m0_to_f32

        info, b0 = it.info, BLOCK
        rows, cols = info.shape
        scale = self.ck.read_info(it.scale)
        scale = e8m0_to_f32(scale) if it.scale.dtype == "F8_E8M0" else scale.float()
        per = rows // self.mp
        step = max(b0, min(per, self.ring.buffers[0].numel() // cols) // b0 * b0)
        for f, r in targets:
            for r0 in range(r * per, (r + 1) * per, step):
                r1 = min((r + 1) * per, r0 + step)
                slot, buf = self._take(1)
                raw = self.ck.read_bytes(info, r0 * cols, r1 * cols, out=buf).view(r1 - r0, cols)
                self.read += (r1 - r0) * cols
                self._send(f, slot, self._dequant_write, f, it.mp, raw, scale[r0 // b0 : r1 // b0])
                self.advance((r1 - r0) * cols * 2)

    def _dequant_write(self, f: str, name: str, raw: torch.Tensor, s: torch.Tensor) -> None:
        import torch

        from dsv3_tools.kernels.cpu_dequant import dequant_fp8

        self.writers[f].write_part(
            name, memoryview(dequant_fp8(raw, s, (BLOCK, BLOCK)).view(torch.uint8).reshape(-1).numpy())
        )

    def _gather_write(self, f: str, r: int, name: str, chunk: torch.Tensor) -> None:
        out = self.gather[f][: chunk.shape[0] * chunk.shape[2]].view(chunk.shape[0], chunk.shape[2])
        out.copy_(chunk[:, r, :])
        self.writers[f].write_part(name, memoryview(out.reshape(-1).numpy()))

    def _stream(self, info: TensorInfo, name: str, start: int, stop: int, files: list[str]) -> None:
        step = self.ring.buffers[0].numel()
        for off in range(start, stop, step):
            end = min(stop, off + step)
            slot, buf = self._take(len(files))
            mv = memoryview(self.ck.read_bytes(info, off, end, out=buf).numpy())
            self.read += end - off
            for f in files:
                self._send(f, slot, self.writers[f].write_part, name, mv)
                self.advance(end - off)

    def close(self) -> None:
        """Wait for the queued work and stop the workers; re-raise a worker's error."""
        for w in self.workers.values():
            w.close()
        self._check()

    def abort(self) -> None:
        """Drop the queued work and wait for the workers to stop."""
        for w in self.workers.values():
            w.abort()
