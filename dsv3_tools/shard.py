"""``shard``: stream a Hugging Face checkpoint into the official model-parallel layout, in bounded memory.

Output (``DST``): ``model{r}-mp{N}.safetensors`` for r = 0..N-1 with the keys and shapes the DeepSeek inference
demo loads with strict matching: names renamed by the name table (``names.py``), tensors split on the table's dim
with FP8 scales split alongside, routed experts partitioned in contiguous blocks (rank r owns experts
``[r*E/N, (r+1)*E/N)`` whole; others are absent), replicated tensors byte-identical in every rank file. Beside
them: ``config.json`` holding the demo's ``ModelArgs``, ``hf_config.json`` (the original HF config, byte for byte,
read by dsv3-tools), the tokenizer and generation config, and ``dsv3-manifest.json`` with checksums.

Before anything is written, N is checked against every tensor (experts, heads and vocab divisible by N, every
split dim divisible, and for FP8 every split on a block boundary); the error names the first offending tensor
and the degrees that would work.

MTP (``--mtp keep``; the default ``drop`` leaves it out, as the demo expects): layer ``L = num_hidden_layers``
(and following) is written under the same rules, with these extra names:

- ``layers.{L}.embed.weight``: its token embedding, split on vocab rows like ``embed``;
- ``layers.{L}.enorm.weight``, ``layers.{L}.hnorm.weight``: the two RMSNorms, replicated;
- ``layers.{L}.eh_proj.weight``: the [H, 2H] projection, replicated;
- ``layers.{L}.shared_head.norm.weight`` (replicated) and ``layers.{L}.shared_head.head.weight`` (vocab rows);
- ``layers.{L}.attn_norm``, ``attn.*``, ``ffn_norm``, ``ffn.*``: its decoder block, named and split as any layer.

Streaming: every rank file's header is planned from the input headers first; the input tensors are then read
once each, in file order, in chunks of at most ``CHUNK`` bytes, and each chunk's slices are appended to the rank
files, whose tensor order is that same input order, so every writer advances sequentially. Memory is a few
chunks, independent of the checkpoint's size, the largest tensor and N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import names as N
from .checkpoint import MP_HF_CONFIG, Checkpoint, TensorInfo, open_checkpoint
from .config import ModelConfig
from .errors import ConfigError, OutputError, ShardingError
from .writer import (
    MP_SIDECAR_PATTERNS,
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
    write_json_atomic,
)

Progress = Callable[[int], None]
CHUNK = 32 << 20  # bytes per read (two in flight): bounds memory whatever the tensor size
MTP_MODES = ("drop", "keep")


def rank_file(rank: int, world: int) -> str:
    return f"model{rank}-mp{world}.safetensors"


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

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the degree check
@dataclass(frozen=True)
class _Rule:
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


def _rules(cfg: ModelConfig, tensors: list[tuple[str, tuple[int, ...], bool]]) -> list[_Rule]:
    """The constraints ``(hf name, shape, block-quantized)`` tensors put on N, deduplicated, in tensor order."""
    block = cfg.block_size
    rules: dict[tuple[str, int, int], _Rule] = {}

    def add(r: _Rule) -> None:
        rules.setdefault((r.what, r.size, r.unit), r)

    for name, shape, quantized in tensors:
        n = N.parse_hf(name)
        if n.split == N.EXPERT:
            add(_Rule(name, "n_routed_experts", cfg.n_routed_experts, 1))
        elif isinstance(n.split, int):
            if n.module.hf.startswith("self_attn."):
                add(_Rule(name, "num_attention_heads", cfg.num_attention_heads, 1))
            unit = block[n.split] if quantized and not n.is_scale else 1
            add(_Rule(name, f"dim {n.split} of size", shape[n.split], unit))
    return list(rules.values())


def _valid(rules: list[_Rule]) -> list[int]:
    limit = min((r.size for r in rules), default=1)
    return [n for n in range(1, max(limit, 1) + 1) if all(r.violated(n) is None for r in rules)]


def _check(rules: list[_Rule], mp: int) -> None:
    for r in rules:
        why = r.violated(mp)
        if why:
            ok = ", ".join(map(str, _valid(rules)))
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
    return _valid(_rules(cfg, tensors))


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Item:
    """One input tensor and where its pieces go."""

    info: TensorInfo
    name: N.Name
    ranks: tuple[int, ...]  # ranks holding a piece (all for split/replicated; the owner for an expert)
    shape: tuple[int, ...]  # the per-rank shape


def _plan(ck: Checkpoint, cfg: ModelConfig, mp: int, keep_mtp: bool) -> tuple[list[_Item], int]:
    """Input tensors in read order (file, then offset) with their destinations; and how many MTP tensors drop."""
    order = {f: i for i, f in enumerate(sorted(ck.files))}  # file-name order: model-00001-of-... first
    items: list[_Item] = []
    dropped = 0
    per = cfg.n_routed_experts // mp if cfg.n_routed_experts % mp == 0 else 0
    for info in sorted(ck.tensors.values(), key=lambda i: (order[i.file], i.start)):
        n = N.parse_hf(info.name)
        if n.layer is not None and cfg.is_mtp_layer(n.layer) and not keep_mtp:
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
        items.append(_Item(info, n, ranks, shape))
    return items, dropped


def demo_model_args(cfg: ModelConfig) -> dict:
    """The upstream demo's ``ModelArgs`` for ``cfg`` (its ``config.json``), so ``generate.py`` runs on DST as is.

    ``mscale`` is the HF ``mscale_all_dim`` (the demo uses it for the softmax correction, as HF does with
    ``mscale_all_dim``); ``max_seq_len`` is the demo's default 16384 capped by the model's context, since the
    demo sizes its KV cache by it and applies YaRN only when it exceeds ``original_seq_len``.
    """
    rs = cfg.rope_scaling
    args: dict = {
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "inter_dim": cfg.intermediate_size,
        "moe_inter_dim": cfg.moe_intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_dense_layers": cfg.first_k_dense_replace,
        "n_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.num_experts_per_tok,
        "n_expert_groups": cfg.n_group,
        "n_limited_groups": cfg.topk_group,
        "route_scale": cfg.routed_scaling_factor,
        "score_func": cfg.scoring_func,
        "q_lora_rank": cfg.q_lora_rank or 0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
    }
    if cfg.is_fp8:
        args["dtype"] = "fp8"
        if cfg.quant.scale_fmt:
            args["scale_fmt"] = cfg.quant.scale_fmt
    args["max_seq_len"] = min(cfg.max_position_embeddings, 4 * 4096)
    args["original_seq_len"] = rs.original_max_position_embeddings if rs else cfg.max_position_embeddings
    args["rope_theta"] = cfg.rope_theta
    args["rope_factor"] = rs.factor if rs else 1.0
    args["beta_fast"] = _int_if_whole(rs.beta_fast if rs else 32.0)
    args["beta_slow"] = _int_if_whole(rs.beta_slow if rs else 1.0)
    args["mscale"] = rs.mscale_all_dim if rs else 1.0
    return args


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


# ---------------------------------------------------------------------- the stage
def shard_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    mp: int,
    mtp: str = "drop",
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ShardReport:
    """Write the model-parallel layout of the HF checkpoint ``src`` for ``mp`` ranks into the new folder ``dst``.

    Resumes a run interrupted with the same arguments (finished rank files whose checksum still matches are
    kept). ``progress`` receives the number of rank-file bytes written as they are written.
    """
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    check_separate(src, dst)
    if mtp not in MTP_MODES:
        raise ShardingError(f"--mtp must be 'drop' or 'keep', got {mtp!r}")
    if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
        raise ShardingError(f"--mp must be a positive integer, got {mp!r}")
    ck = open_checkpoint(src)
    try:
        return _shard(ck, src, dst, mp, mtp, dry_run, progress, t0)
    finally:
        ck.close()


def _shard(
    ck: Checkpoint, src: Path, dst: Path, mp: int, mtp: str, dry_run: bool, progress: Progress | None, t0: float
) -> ShardReport:
    if ck.layout == "mp":
        raise ShardingError(f"{src} is already in the model-parallel layout; shard a Hugging Face checkpoint")
    cfg = ck.config
    if cfg is None:
        raise ConfigError(f"{src}: no config.json")
    fp8 = any(i.dtype == "F8_E4M3" for i in ck.tensors.values())
    items, dropped = _plan(ck, cfg, mp, mtp == "keep")
    rules = _rules(
        cfg, [(it.info.name, it.info.shape, fp8 and (it.info.dtype == "F8_E4M3" or it.name.is_scale)) for it in items]
    )
    _check(rules, mp)

    entries: list[list[tuple[str, str, tuple[int, ...]]]] = [[] for _ in range(mp)]
    for it in items:
        for r in it.ranks:
            entries[r].append((it.name.mp, it.info.dtype, it.shape))
    names = [rank_file(r, mp) for r in range(mp)]
    sizes = []
    for r in range(mp):
        header, offsets = plan_header(entries[r], {"format": "pt"})
        sizes.append(len(header) + max((e for _, e in offsets.values()), default=0))
    sidecars = sidecar_files(src, MP_SIDECAR_PATTERNS)
    model_args = demo_model_args(cfg)
    job = {
        "stage": "shard",
        "mp": mp,
        "mtp": mtp,
        "source": source_fingerprint(src, [*ck.files, "config.json"]),
    }

    # Which rank files an earlier run of this same job already finished (size check here; checksum on open).
    old = read_manifest(dst) if dst.is_dir() else None
    old_files = old.get("files", {}) if old and old.get("job") == job else {}

    def finished(name: str) -> bool:
        rec = old_files.get(name)
        return rec is not None and (dst / name).is_file() and (dst / name).stat().st_size == rec["size"]

    side_bytes = sum((src / s).stat().st_size for s in sidecars) + 2 * (src / "config.json").stat().st_size + 4096
    needed = sum(s for n, s in zip(names, sizes) if not finished(n)) + side_bytes
    free = free_bytes(dst)
    if dst.is_dir():  # partial files of an interrupted run are deleted before writing: their space counts as free
        free += sum(f.stat().st_size for f in dst.glob(".*" + PARTIAL_SUFFIX))
    fits = needed <= free
    dtype = "fp8" if fp8 else "bf16"
    valid = _valid(rules)

    def report(files: list[ShardFile], read: int, written: int) -> ShardReport:
        return ShardReport(
            str(src), str(dst), mp, mtp, dtype, dry_run, files, sidecars, len(ck.tensors), dropped, read, written,
            needed, free, fits, valid, round(time.monotonic() - t0, 3), model_args,
        )  # fmt: skip

    if dry_run:
        files = [
            ShardFile(n, r, len(entries[r]), sizes[r], "kept" if finished(n) else "planned")
            for r, n in enumerate(names)
        ]
        pending = {r for r, n in enumerate(names) if not finished(n)}
        read = sum(it.info.nbytes for it in items if pending.intersection(it.ranks))
        return report(files, read, sum(sizes[r] for r in pending))
    if not fits:
        raise OutputError(
            f"{dst}: needs {needed} bytes of free space, only {free} available; free space or pick another disk"
        )

    man = Manifest.open(dst, job)
    pending = [r for r in range(mp) if not man.is_done(names[r])]
    read, written = _write_ranks(ck, items, mp, pending, entries, names, dst, man, progress)
    status = {r: "written" if r in pending else "kept" for r in range(mp)}
    files = [ShardFile(n, r, len(entries[r]), sizes[r], status[r]) for r, n in enumerate(names)]

    for s in sidecars:
        if not man.is_done(s):
            man.record(copy_file_atomic(src / s, dst / s))
    if not man.is_done(MP_HF_CONFIG):
        man.record(copy_file_atomic(src / "config.json", dst / MP_HF_CONFIG))
    if not man.is_done("config.json"):
        man.record(write_json_atomic(dst / "config.json", model_args))
    man.extra = {"mp": mp, "mtp": mtp, "dtype": dtype, "experts_per_rank": cfg.n_routed_experts // mp}
    man.finish()
    return report(files, read, written)


def _write_ranks(
    ck: Checkpoint,
    items: list[_Item],
    mp: int,
    pending: list[int],
    entries: list[list[tuple[str, str, tuple[int, ...]]]],
    names: list[str],
    dst: Path,
    man: Manifest,
    progress: Progress | None,
) -> tuple[int, int]:
    """Stream every input tensor once into the pending rank files; return (bytes read, bytes written)."""
    writers: dict[int, SafetensorsWriter] = {}
    pipe: _Pipe | None = None
    try:
        for r in pending:
            writers[r] = SafetensorsWriter(dst / names[r], entries[r], {"format": "pt"})
        rows = [it.info.nbytes // it.info.shape[0] for it in items if it.info.shape and it.info.shape[0]]
        pipe = _Pipe(ck, writers, mp, max(CHUNK, *rows, 1), progress or (lambda n: None))
        for it in items:
            if any(r in writers for r in it.ranks):
                pipe.copy(it)
        pipe.close()
        for r in pending:  # record each as soon as it is complete: a kill from here on loses less
            man.record(writers[r].finish(), rank=r, world=mp, tensors=len(entries[r]))
    except BaseException:
        # Ctrl-C or an error: stop the workers, leave no partial files; finished outputs stay recorded.
        if pipe is not None:
            pipe.close(cancel=True)
        for w in writers.values():
            w.abort()
        raise
    return pipe.read, sum(w.size for w in writers.values())


class _Pipe:
    """Reads input chunks in the calling thread and hands them to one FIFO worker per rank file.

    Chunk k+1 is read while chunk k is written and hashed (file writes and sha256 release the GIL), so the
    run approaches the read+write floor. Two read buffers alternate; a buffer is reused only after every
    writer is done with it. A rank's worker is serial, so its file still receives bytes in planned order.
    """

    def __init__(
        self, ck: Checkpoint, writers: dict[int, SafetensorsWriter], mp: int, size: int, advance: Progress
    ) -> None:
        self.ck, self.writers, self.mp, self.advance = ck, writers, mp, advance
        self.bufs = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        self.busy: list[list[Future]] = [[], []]  # work still using each buffer
        self.k = 0
        self.workers = {r: ThreadPoolExecutor(1, thread_name_prefix=f"shard-rank{r}") for r in writers}
        self.gather = {r: torch.empty(size // mp + 1, dtype=torch.uint8) for r in writers}  # split-1 pieces
        self.read = 0

    def _next_buf(self) -> torch.Tensor:
        slot = self.k % 2
        self.k += 1
        for f in self.busy[slot]:
            f.result()  # re-raises a worker's error here
        self.busy[slot] = []
        return self.bufs[slot]

    def _submit(self, r: int, fn: Callable, *args: object) -> None:
        self.busy[(self.k - 1) % 2].append(self.workers[r].submit(fn, *args))

    def copy(self, it: _Item) -> None:
        """Queue one input tensor's pieces for its target rank files, a chunk at a time."""
        info, name, mp = it.info, it.name.mp, self.mp
        ranks = [r for r in it.ranks if r in self.writers]
        nbytes = info.nbytes
        if nbytes == 0:
            for r in ranks:
                self._submit(r, self.writers[r].write_raw, name, memoryview(b""))
            return
        if it.name.split == 0:
            part = nbytes // mp  # rank r's rows are one contiguous byte range of the input
            for r in ranks:
                self._stream(info, name, r * part, (r + 1) * part, [r])
        elif it.name.split == 1:
            assert len(info.shape) == 2, info
            row = nbytes // info.shape[0]
            step = max(1, self.bufs[0].numel() // row)
            for r0 in range(0, info.shape[0], step):
                r1 = min(info.shape[0], r0 + step)
                buf = self._next_buf()
                chunk = self.ck.read_bytes(info, r0 * row, r1 * row, out=buf).view(r1 - r0, mp, row // mp)
                self.read += (r1 - r0) * row
                for r in ranks:
                    self._submit(r, self._gather_write, r, name, chunk)
                    self.advance((r1 - r0) * (row // mp))
        else:  # replicated, or a whole expert: the same bytes to every target
            self._stream(info, name, 0, nbytes, ranks)

    def _gather_write(self, r: int, name: str, chunk: torch.Tensor) -> None:
        out = self.gather[r][: chunk.shape[0] * chunk.shape[2]].view(chunk.shape[0], chunk.shape[2])
        out.copy_(chunk[:, r, :])
        self.writers[r].write_part(name, memoryview(out.reshape(-1).numpy()))

    def _stream(self, info: TensorInfo, name: str, start: int, stop: int, ranks: list[int]) -> None:
        step = self.bufs[0].numel()
        for off in range(start, stop, step):
            end = min(stop, off + step)
            mv = memoryview(self.ck.read_bytes(info, off, end, out=self._next_buf()).numpy())
            self.read += end - off
            for r in ranks:
                self._submit(r, self.writers[r].write_part, name, mv)
                self.advance(end - off)

    def close(self, cancel: bool = False) -> None:
        """Wait for (or, with ``cancel``, drop) queued work and stop the workers; re-raise a worker's error."""
        for w in self.workers.values():
            w.shutdown(wait=True, cancel_futures=cancel)
        if not cancel:
            for slot in self.busy:
                for f in slot:
                    f.result()
