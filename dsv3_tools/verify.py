"""``verify``: prove that a checkpoint computes what a reference did, and say where it does not.

Two parts. Structural checks (always; cheap): the tensor set against the config in any layout, scales where the
config puts them, the config against the content, replicated tensors identical across rank files, and with
``checksums`` the files against ``dsv3-manifest.json`` and the Hub download metadata. The numeric check runs the
model (``model.run_model``) on prompts and compares the logits of every position, and summaries of every layer's
hidden states, with a reference: a file written by ``save_reference`` or another checkpoint folder. How close is
close enough depends on what differs between the two runs (``choose_tier``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import names as N
from .checkpoint import Checkpoint, open_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Dsv3Error, ShardingError
from .layout import MANIFEST_NAME, MP_HF_CONFIG, MP_RE
from .reference import (
    PROJ_SEED,
    TIERS,
    Logits,
    LogitStats,
    PromptRecord,
    Reference,
    ReferenceError,
    Thresholds,
    compare_logits,
    hidden_errors,
    load_reference,
    make_projection,
    summarize,
)
from .reference import (
    save_reference as write_reference,
)
from .runtime import check_device, dist_info
from .stfile import TensorInfo, torch_dtype
from .writer import TOOL_VERSION, read_manifest, sha256_file, source_fingerprint

Progress = Callable[[int], None]
Log = Callable[[str], None]

# Problems that leave the checkpoint loadable by the model (the numeric check still runs).
_RUNNABLE_KINDS = {
    "index_mismatch",
    "unexpected_tensor",
    "orphan_scale",
    "checksum",
    "replica",
    "config_args",
    "scale_value",
}

DEFAULT_PROMPTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6. 深度求索 (DeepSeek) 检查点验证。",
    "A checkpoint converted from one format to another should compute exactly what the original computed. "
    "This tool runs the model on a few prompts, keeps the logits of every position and a summary of every "
    "layer's hidden states, and compares them with a reference made from the original checkpoint, so that a "
    "wrong scale, a swapped expert or a truncated shard is found and named before anyone serves the model.",
)


# ---------------------------------------------------------------------- report


@dataclass
class MemoryPlan:
    """What a run needs in memory, estimated from the tensor sizes before anything is loaded."""

    mode: str  # "stream" or "resident"
    device: str
    available_bytes: int | None
    weights_bytes: int  # the whole model's weights as the model holds them (compute dtype, or FP8 for --gemm fp8)
    largest_layer: int | None
    largest_layer_bytes: int
    top_bytes: int  # embedding, final norm, head
    activation_bytes: int
    resident_peak_bytes: int
    stream_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.stream_peak_bytes if self.mode == "stream" else self.resident_peak_bytes


@dataclass
class PromptResult:
    index: int
    tokens: int
    stats: LogitStats
    mtp: LogitStats | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class Divergence:
    """Where the hidden states first leave the tolerance: ``layer`` -1 is the embedding output."""

    layer: int | None  # None: no layer exceeds the tolerance (the difference starts after the last layer)
    where: str
    error: float
    prompt: int | None = None
    position: int | None = None
    layer_errors: list[float] = field(default_factory=list)  # row 0: embedding, then layer 0, 1, ...


@dataclass
class TensorDiff:
    name: str
    kind: str  # missing / extra / shape / dtype / value
    detail: str
    rel_err: float | None = None


@dataclass
class VerifyReport:
    """Everything ``verify`` found; ``exit_code`` is 0 for pass and 1 for fail (bad input raises instead)."""

    path: str
    layout: str
    world: int
    verdict: str = "pass"
    problems: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checksums: dict | None = None
    reference: str | None = None
    reference_kind: str | None = None  # "file" | "checkpoint"
    saved_reference: str | None = None
    tier: str | None = None
    tier_reasons: list[str] = field(default_factory=list)
    thresholds: dict | None = None
    prompts: list[PromptResult] = field(default_factory=list)
    overall: LogitStats | None = None
    mtp_overall: LogitStats | None = None
    failures: list[str] = field(default_factory=list)
    divergence: Divergence | None = None
    tensor_diffs: list[TensorDiff] = field(default_factory=list)
    suspect_files: dict[str, int] = field(default_factory=dict)  # this checkpoint's files holding differing tensors
    memory: MemoryPlan | None = None
    run: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if self.memory is not None:
            d["memory"]["peak_bytes"] = self.memory.peak_bytes
        return d


# ---------------------------------------------------------------------- structural checks


def _problem(kind: str, message: str, file: str | None = None, tensor: str | None = None) -> dict:
    return {"kind": kind, "file": file, "tensor": tensor, "message": message}


def check_structure(
    ck: Checkpoint, *, checksums: bool = False, progress: Progress | None = None
) -> tuple[list[dict], list[str]]:
    """Structural problems and warnings beyond what ``open_checkpoint`` collects (which are included)."""
    problems = [p.as_dict() for p in ck.problems]
    warnings: list[str] = []
    if ck.config is None:
        problems.append(_problem("config", "no config: names, shapes and dtypes cannot be checked", "config.json"))
        return problems, warnings
    if ck.layout == "mp":
        problems += _check_model_args(ck)
        if dist_info()[0] == 0:  # reads a few small tensors of every rank file: one process does it
            problems += _check_replicas(ck, limit=None if checksums else 1 << 20)
    else:
        for rel, h in ck.headers.items():
            if h.metadata.get("format") != "pt":
                warnings.append(f"{rel}: safetensors metadata lacks format=pt (transformers refuses such files)")
                break
        if ck.layout == "hf-sharded" and not (
            isinstance(ck.index.get("metadata"), dict) and "total_size" in ck.index["metadata"]
        ):
            warnings.append("index has no metadata.total_size (some loaders need it)")
    if not (ck.path / "tokenizer.json").is_file():
        warnings.append("no tokenizer.json: text prompts cannot be tokenized (default prompts use fixed token ids)")
    problems += _check_scale_values(ck)
    return problems, warnings


def _check_model_args(ck: Checkpoint) -> list[dict]:
    """The MP folder's ``config.json`` (the demo's ModelArgs) must describe the same model as ``hf_config.json``."""
    p = ck.path / "config.json"
    if not p.is_file():
        return [
            _problem(
                "config_args", "no config.json (the inference demo's ModelArgs) beside the rank files", "config.json"
            )
        ]
    try:
        args = json.loads(p.read_text())
        assert isinstance(args, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        return [_problem("config_args", "config.json is not a JSON object", "config.json")]
    cfg = ck.config
    # The geometry keys of the demo's ModelArgs, as shard writes them (max_seq_len is the user's to choose; dtype and
    # scale_fmt are checked below).
    from .modelargs import demo_model_args

    want = {k: v for k, v in demo_model_args(cfg).items() if k not in ("max_seq_len", "dtype", "scale_fmt")}
    out = []
    for k, v in want.items():
        if (
            k in args
            and args[k] != v
            and not (isinstance(v, float) and isinstance(args[k], (int, float)) and float(args[k]) == v)
        ):
            out.append(
                _problem("config_args", f"ModelArgs {k}={args[k]!r} but {MP_HF_CONFIG} implies {v!r}", "config.json")
            )
    dt = args.get("dtype", "bf16")
    if (dt == "fp8") != cfg.is_fp8:
        out.append(
            _problem(
                "config_args",
                f"ModelArgs dtype={dt!r} but the weights are {'FP8' if cfg.is_fp8 else 'BF16'}",
                "config.json",
            )
        )
    sf = cfg.quant.scale_fmt if cfg.quant else None
    if cfg.is_fp8 and args.get("scale_fmt") != sf:
        out.append(
            _problem(
                "config_args",
                f"ModelArgs scale_fmt={args.get('scale_fmt')!r}, {MP_HF_CONFIG} says {sf!r}",
                "config.json",
            )
        )
    return out


def _check_replicas(ck: Checkpoint, limit: int | None) -> list[dict]:
    """Replicated tensors must hold the same bytes in every rank file (a file from another checkpoint shows here)."""
    out = []
    for name, parts in ck.mp_parts.items():
        if len(parts) < 2:
            continue
        try:
            split = N.parse_hf(name).split
        except CheckpointError:
            continue
        if split is not None or (limit is not None and parts[0].info.nbytes > limit):
            continue
        parts = sorted(parts, key=lambda p: p.rank)
        base = ck.read_bytes(parts[0].info)
        for p in parts[1:]:
            if p.info.shape != parts[0].info.shape or not torch.equal(ck.read_bytes(p.info), base):
                out.append(
                    _problem(
                        "replica", f"replicated tensor differs between rank 0 and rank {p.rank}", p.info.file, name
                    )
                )
    return out


def _check_scale_values(ck: Checkpoint) -> list[dict]:
    """Block scales are positive and finite (quantization never makes anything else). Under torchrun each rank
    reads only its own file."""
    rank, world = dist_info()
    out = []
    for name in ck.tensors:
        if not name.endswith("_scale_inv"):
            continue
        pieces = ck.mp_parts.get(name, []) if ck.layout == "mp" else []
        infos = [p.info for p in pieces if world == 1 or p.rank == rank] if pieces else [ck.tensors[name]]
        for info in infos:
            if info.dtype != "F32":
                continue
            s = ck.read_info(info)
            bad = ~(torch.isfinite(s) & (s > 0))
            if bool(bad.any()):
                idx = [int(i) for i in bad.nonzero()[0]]
                out.append(_problem("scale_value", f"scale block {idx} is {float(s[tuple(idx)])}", info.file, name))
    return out


def check_checksums(ck: Checkpoint, progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Re-hash files against ``dsv3-manifest.json`` and the Hub download metadata (``.cache/huggingface``)."""
    want: dict[str, tuple[str, str, int | None]] = {}  # file -> (sha256, source, size)
    problems: list[dict] = []
    man = read_manifest(ck.path)
    if man is not None:
        if not man.get("complete", False):
            problems.append(_problem("checksum", "the run that wrote this folder did not finish", MANIFEST_NAME))
        for name, rec in man.get("files", {}).items():
            if isinstance(rec, dict) and "sha256" in rec:
                want[name] = (rec["sha256"], MANIFEST_NAME, rec.get("size"))
    meta_dir = ck.path / ".cache" / "huggingface" / "download"
    if meta_dir.is_dir():
        for m in meta_dir.rglob("*.metadata"):
            rel = m.relative_to(meta_dir).as_posix().removesuffix(".metadata")
            lines = m.read_text(errors="replace").splitlines()
            etag = lines[1].strip().strip('"') if len(lines) > 1 else ""
            if re.fullmatch(r"[0-9a-f]{64}", etag) and rel not in want:  # LFS files: the etag is their sha256
                want[rel] = (etag, "hub download metadata", None)
    rank, world = dist_info()
    if world > 1:  # each rank re-hashes its own rank file; rank 0 also every other file
        mine = {rel for rel in want if (m := MP_RE.match(rel)) and int(m.group(1)) == rank}
        want = {k: v for k, v in want.items() if k in mine or (rank == 0 and not MP_RE.match(k))}
    checked, bad = 0, 0
    for rel, (sha, src, size) in sorted(want.items()):
        p = ck.path / rel
        if not p.is_file():
            problems.append(_problem("checksum", f"listed in {src} but missing", rel))
            bad += 1
            continue
        if size is not None and p.stat().st_size != size:
            problems.append(_problem("checksum", f"size {p.stat().st_size} != {size} recorded in {src}", rel))
            bad += 1
            continue
        got = sha256_file(p)
        if progress:
            progress(p.stat().st_size)
        checked += 1
        if got != sha:
            problems.append(_problem("checksum", f"sha256 {got[:12]}... != {sha[:12]}... recorded in {src}", rel))
            bad += 1
    data = [f for f in ck.files if f not in want]
    summary = {
        "files_checked": checked,
        "mismatches": bad,
        "unlisted_data_files": data,
        "sources": sorted({s for _, s, _ in want.values()}),
    }
    return summary, problems


# ---------------------------------------------------------------------- prompts


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line (``\\n`` inside a line stays literal text)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Dsv3Error(f"{path}: cannot read prompts ({e.__class__.__name__})") from None
    texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise Dsv3Error(f"{path}: no prompts (one text per line)")
    return texts


def read_tokens_file(path: str | Path) -> list[list[int]]:
    """A JSON list of lists of token ids."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Dsv3Error(f"{path}: not a readable JSON file ({e.__class__.__name__})") from None
    if (
        not isinstance(data, list)
        or not data
        or not all(
            isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in data
        )
    ):
        raise Dsv3Error(f"{path}: expected a JSON list of non-empty lists of integer token ids")
    return data


def tokenize(folder: str | Path, texts: list[str]) -> list[list[int]]:
    """Token ids of each text through the checkpoint's ``tokenizer.json`` (special tokens as it defines them)."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        raise Dsv3Error(f"{folder}: no tokenizer.json to tokenize the prompts; pass --tokens instead")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises its own exception type for a bad file
        raise Dsv3Error(f"{p}: cannot load the tokenizer ({e})") from None
    return [tok.encode(t).ids for t in texts]


def default_ids(folder: Path, vocab: int) -> list[list[int]]:
    """The built-in prompts through the checkpoint's tokenizer, or fixed pseudo-random ids when it has none."""
    if (folder / "tokenizer.json").is_file():
        return tokenize(folder, list(DEFAULT_PROMPTS))
    g = torch.Generator().manual_seed(PROJ_SEED)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (2, 11, 33, 47, 120)]


def _check_ids(ids: list[list[int]], vocab: int) -> None:
    for i, row in enumerate(ids):
        if not row:
            raise Dsv3Error(f"prompt {i} is empty")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise Dsv3Error(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")


# ---------------------------------------------------------------------- running the model


def _device_desc(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _gather_problems(problems: list[dict]) -> list[dict]:
    """The union of every rank's problems, in rank order, without duplicates."""
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, problems)
    out, seen = [], set()
    for ps in every:
        for p in ps:
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _layer_bytes(ck: Checkpoint) -> dict[int | None, int]:
    """On-disk bytes per layer (None: top-level tensors), over every rank file."""
    out: dict[int | None, int] = {}
    for name in ck.tensors:
        try:
            layer = N.parse_hf(name).layer
        except CheckpointError:
            continue
        infos = [p.info for p in ck.mp_parts[name]] if ck.layout == "mp" else [ck.tensors[name]]
        out[layer] = out.get(layer, 0) + sum(i.nbytes for i in infos)
    return out


def _compute_bytes(ck: Checkpoint, dtype: torch.dtype, gemm: str) -> tuple[dict[int | None, int], int]:
    """Bytes per layer as the model holds the weights (the compute dtype; FP8 kept as FP8 on the FP8 GEMM path;
    F32 tensors as F32), and the largest tensor's element count."""
    esize = torch.empty((), dtype=dtype).element_size()
    out: dict[int | None, int] = {}
    largest = 0
    for name in ck.tensors:
        if name.endswith("_scale_inv"):
            continue
        try:
            layer = N.parse_hf(name).layer
        except CheckpointError:
            continue
        info = ck.tensors[name]
        numel = math.prod(ck.full_shape(name))
        largest = max(largest, numel)
        size = 4 if info.dtype == "F32" else 1 if (info.dtype == "F8_E4M3" and gemm == "fp8") else esize
        out[layer] = out.get(layer, 0) + numel * size
    return out, largest


def _available(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_plan(
    ck: Checkpoint,
    ids: list[list[int]],
    *,
    device: str,
    stream: bool | None,
    dtype: torch.dtype,
    gemm: str = "bf16",
) -> MemoryPlan:
    """Estimate resident and streamed peaks; choose streaming when the resident run would not fit (``stream=None``)."""
    cfg = ck.config
    per_layer, largest = _compute_bytes(ck, dtype, gemm)
    layers = {k: v for k, v in per_layer.items() if k is not None and not cfg.is_mtp_layer(k)}
    big = max(layers, key=layers.get) if layers else None
    top = per_layer.get(None, 0)
    esize = torch.empty((), dtype=dtype).element_size()
    T = max((len(r) for r in ids), default=0)
    # Residual stream and a handful of per-layer temporaries, one prompt's attention scores, every prompt's logits
    # (f32, kept on the host), and the largest weight in flight as read plus dequantized (BF16).
    act = (
        sum(len(r) for r in ids) * (cfg.hidden_size * esize * 8 + cfg.vocab_size * 4)
        + T * T * cfg.num_attention_heads * 4
    )
    transient = largest * 3
    total = sum(v for k, v in per_layer.items() if k is None or not cfg.is_mtp_layer(k))
    resident = total + act + transient
    # Streaming holds one layer at a time; the embedding and the head are loaded only around the layers.
    streamed = max(layers.get(big, 0), top) + act + transient
    avail = _available(device)
    if stream is None:
        stream = avail is not None and resident > 0.8 * avail
    return MemoryPlan(
        "stream" if stream else "resident",
        _device_desc(device),
        avail,
        total,
        big,
        layers.get(big, 0),
        top,
        act,
        resident,
        streamed,
    )


def _embedding_rows(ck: Checkpoint, ids: list[int]) -> torch.Tensor:
    """The embedding output for ``ids`` [T, H] in f32, read row by row (the model's layer -1)."""
    name = "model.embed_tokens.weight"
    rows = []
    if ck.layout == "mp":
        parts = sorted(ck.mp_parts[name], key=lambda p: p.rank)
        per = parts[0].info.shape[0]
        for t in ids:
            info = parts[t // per].info
            row = info.nbytes // info.shape[0]
            raw = ck.read_bytes(info, (t % per) * row, (t % per + 1) * row)
            rows.append(raw.view(torch.bfloat16 if info.dtype == "BF16" else torch.float32).float())
    else:
        for t in ids:
            rows.append(ck.read_rows(name, t, t + 1)[0].float())
    return torch.stack(rows)


def weight_probe(ck: Checkpoint) -> dict[int, torch.Tensor]:
    """Effective weights of one row per block row of each main layer's ``kv_a_proj_with_mqa`` (BF16 [n, H]).

    That tensor is replicated in every layout, so rank 0's piece (or this rank's, under torchrun) is all of it.
    """
    from dsv3_tools.kernels.weight_dequant import weight_dequant_ref

    cfg = ck.config
    rank, _ = dist_info()
    b0, b1 = cfg.block_size
    out = {}
    for L in cfg.main_layers:
        name = f"model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight"
        info = _local_info(ck, name, rank)
        sinfo = _local_info(ck, name + "_scale_inv", rank) if info is not None and info.dtype == "F8_E4M3" else None
        if info is None or len(info.shape) != 2 or (info.dtype == "F8_E4M3" and sinfo is None):
            continue
        M, H = info.shape
        row_bytes = info.nbytes // M
        scale = ck.read_info(sinfo) if sinfo is not None else None
        rows = []
        for r in range(0, M, b0):
            w = ck.read_bytes(info, r * row_bytes, (r + 1) * row_bytes).view(torch_dtype(info.dtype)).reshape(1, H)
            if scale is not None:
                rows.append(weight_dequant_ref(w, scale[r // b0 : r // b0 + 1], (b0, b1))[0])
            else:
                rows.append(w[0].to(torch.bfloat16))
        out[L] = torch.stack(rows)
    return out


def _local_info(ck: Checkpoint, name: str, rank: int) -> TensorInfo | None:
    if ck.layout == "mp":
        for p in ck.mp_parts.get(name, []):
            if p.rank == rank:
                return p.info
        return None
    return ck.tensors.get(name)


@dataclass
class _Run:
    records: list[PromptRecord]
    meta: dict
    probe: dict[int, torch.Tensor]
    seconds: float


def has_mtp_tensors(ck: Checkpoint) -> bool:
    cfg = ck.config
    return cfg.num_nextn_predict_layers > 0 and any(
        n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in ck.tensors
    )


def geometry_digest(cfg: ModelConfig) -> str:
    """sha256 of what fixes the forward pass's shapes and math, not the weights' precision or the MTP depth."""
    skip = {"raw", "quant", "torch_dtype", "bos_token_id", "eos_token_id", "num_nextn_predict_layers"}
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}
    d["rope_scaling"] = asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _run(
    ck: Checkpoint,
    ids: list[list[int]],
    *,
    device: str,
    engine: str,
    gemm: str,
    stream: bool,
    mtp: bool,
    dtype: torch.dtype,
    projection: torch.Tensor,
    progress: Progress | None,
) -> _Run:
    """Run the model on ``ids``, keeping full logits and per-layer hidden summaries."""
    from .model import run_model

    cfg = ck.config
    rank, world = dist_info()
    L = cfg.num_hidden_layers
    P = projection.shape[1]
    norms = [torch.full((L + 1, len(r)), float("nan")) for r in ids]
    projs = [torch.full((L + 1, len(r), P), float("nan")) for r in ids]
    if world == 1:  # the embedding summary reads rows of every rank's file: single process only
        for i, r in enumerate(ids):
            e = _embedding_rows(ck, r)
            norms[i][0], projs[i][0] = e.norm(dim=-1), e @ projection
    lbytes = _layer_bytes(ck)

    def on_layer(layer: int, hidden: list[torch.Tensor]) -> None:
        for i, h in enumerate(hidden):
            h = h.detach().to("cpu", torch.float32)
            norms[i][1 + layer] = h.norm(dim=-1)
            projs[i][1 + layer] = h @ projection
        if progress:
            progress(lbytes.get(layer, 0))

    t0 = time.perf_counter()
    out = run_model(
        ck, ids, device=device, engine=engine, gemm=gemm, stream=stream, mtp=mtp, on_layer=on_layer, dtype=dtype
    )
    seconds = time.perf_counter() - t0
    if progress:
        progress(sum(v for k, v in lbytes.items() if k is None or k >= L))
    records = []
    for i, r in enumerate(ids):
        lg = out.logits[i]
        if tuple(lg.shape) != (len(r), cfg.vocab_size):
            raise AssertionError(f"run_model returned logits {list(lg.shape)} for a {len(r)}-token prompt")
        m = Logits.from_full(out.mtp_logits[i]) if mtp and out.mtp_logits is not None else None
        records.append(PromptRecord(torch.tensor(r, dtype=torch.int64), Logits.from_full(lg), norms[i], projs[i], m))
    q = cfg.quant
    meta = {
        "tool": "dsv3-tools",
        "tool_version": TOOL_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": {
            "path": str(ck.path.resolve()),
            "layout": ck.layout,
            "world": ck.world,
            "fingerprint": source_fingerprint(ck.path, ck.files),
            "geometry_digest": geometry_digest(cfg),
            "model_type": cfg.model_type,
            "weights": "fp8" if q else "bf16",
            "scale_fmt": q.scale_fmt if q else None,
            "block": list(q.block) if q else None,
        },
        "run": {
            "device": _device_desc(device),
            "engine": engine,
            "gemm": gemm if q else "bf16",  # a BF16 checkpoint has no FP8 GEMM path
            "dtype": str(dtype).removeprefix("torch."),
            "world": world,
            "stream": stream,
            "mtp": mtp,
        },
        "vocab_size": cfg.vocab_size,
        "hidden": {"rows": ["embedding"] + list(range(L)), "proj_dim": P, "proj_seed": PROJ_SEED},
        "probe": {"tensor": "self_attn.kv_a_proj_with_mqa", "rows_every": cfg.block_size[0]},
        "seconds": round(seconds, 3),
    }
    return _Run(records, meta, weight_probe(ck), seconds)


# ---------------------------------------------------------------------- choosing the thresholds


@dataclass
class ProbeDiff:
    """How many probed 128-column weight blocks differ between two runs, over how many, in which layers."""

    differing: int
    compared: int
    layers: list[int]  # layers with at least one differing block
    layers_compared: int

    @property
    def requantized(self) -> bool:
        """Re-quantization changes blocks in every layer; a local edit (a bad file, a wrong tensor) in a few."""
        return (
            self.compared > 0
            and self.differing >= 0.25 * self.compared
            and len(self.layers) >= 0.9 * self.layers_compared
        )


def probe_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> ProbeDiff:
    """Compare two weight probes (``weight_probe``) block by block."""
    diff = total = 0
    layers = []
    common = [L for L in sorted(set(a) & set(b)) if a[L].shape == b[L].shape]
    for L in common:
        x, y = a[L], b[L]
        H = x.shape[1]
        nb = -(-H // 128)
        dx = torch.nn.functional.pad((x != y).to(torch.int8), (0, nb * 128 - H)).reshape(x.shape[0], nb, -1).any(-1)
        n = int(dx.sum())
        diff += n
        total += dx.numel()
        if n:
            layers.append(L)
    return ProbeDiff(diff, total, layers, len(common))


def choose_tier(ref_meta: dict, cand_meta: dict, probe: ProbeDiff | None) -> tuple[str, list[str]]:
    """Which thresholds fit this comparison, and why (see ``reference.TIERS``)."""
    reasons = []
    rw, cw = ref_meta["checkpoint"], cand_meta["checkpoint"]
    requant = False
    if probe is not None and probe.compared > 0:
        d, n = probe.differing, probe.compared
        if probe.requantized:
            requant = True
            reasons.append(f"weights re-quantized: {d} of {n} probed weight blocks differ, in every layer")
        elif d:
            reasons.append(
                f"{d} of {n} probed weight blocks differ, in layers {probe.layers} only: a local change, "
                "not re-quantization"
            )
        else:
            reasons.append("same effective weights (probed blocks identical)")
    elif (rw["weights"], rw["scale_fmt"]) != (cw["weights"], cw["scale_fmt"]) and cw["weights"] == "fp8":
        requant = True
        reasons.append(f"weights re-quantized: {rw['weights']}/{rw['scale_fmt']} -> {cw['weights']}/{cw['scale_fmt']}")
    rr, cr = ref_meta["run"], cand_meta["run"]
    fp8_gemm = rr["gemm"] == "fp8" or cr["gemm"] == "fp8"
    if fp8_gemm:
        reasons.append("FP8 GEMM path (activations quantized online)")
    low = "bfloat16" in (rr.get("dtype"), cr.get("dtype")) and rr.get("dtype") != cr.get("dtype")
    if low:
        reasons.append(f"compute dtype {rr.get('dtype')} vs {cr.get('dtype')}: bfloat16 rounding of every activation")
    if requant or fp8_gemm or low:
        return "quantized", reasons
    diffs = [k for k in ("device", "engine", "dtype", "world") if rr.get(k) != cr.get(k)]
    if diffs:
        reasons.append("different arithmetic: " + ", ".join(f"{k} {rr.get(k)} vs {cr.get(k)}" for k in diffs))
        return "float", reasons
    reasons.append("same arithmetic (device, engine, gemm, dtype, one process): expect bit-identical logits")
    return "exact", reasons


# ---------------------------------------------------------------------- localization


def localize(
    ref: list[PromptRecord], cand: list[PromptRecord], tol: float, cfg: ModelConfig, skip: frozenset = frozenset()
) -> Divergence:
    """The first hidden-state row (embedding, layer 0, 1, ...) whose error exceeds ``tol``; rows in ``skip`` were
    not recorded on one side (the embedding under torchrun)."""
    R = ref[0].hidden_norm.shape[0]
    worst = torch.full((R,), float("nan"), dtype=torch.float64)
    where = [(None, None)] * R
    for i, (r, c) in enumerate(zip(ref, cand)):
        e, pos = hidden_errors(r.hidden_norm, r.hidden_proj, c.hidden_norm, c.hidden_proj)
        for k in range(R):
            if k in skip:
                continue
            ek = float(e[k])
            if ek == ek and not (ek <= float(worst[k])):  # NaN-safe max
                worst[k] = ek
                where[k] = (i, int(pos[k]))
    errs = [float(x) for x in worst]

    def label(k: int) -> str:
        return "embedding (model.embed_tokens)" if k == 0 else f"layer {k - 1} (model.layers.{k - 1})"

    for k, e in enumerate(errs):
        if e == e and e > tol:
            return Divergence(k - 1, label(k), e, where[k][0], where[k][1], errs)
    last = "after the last layer (model.norm / lm_head): no hidden-state row exceeds the tolerance"
    return Divergence(None, last, max((e for e in errs if e == e), default=0.0), None, None, errs)


def _effective(ck: Checkpoint, name: str) -> torch.Tensor:
    from dsv3_tools.kernels.weight_dequant import weight_dequant_ref

    t = ck.read(name)
    if ck.tensors[name].dtype == "F8_E4M3" and N.scale_name(name) in ck.tensors:
        return weight_dequant_ref(t, ck.read(N.scale_name(name)), ck.config.block_size).float()
    return t.float()


def compare_tensors(
    ck: Checkpoint, ref: Checkpoint, layers: list[int | None], th: Thresholds, *, budget: int = 1 << 30
) -> list[TensorDiff]:
    """Tensor-level differences with a reference checkpoint: names and shapes everywhere, values in ``layers``
    (any format, compared as effective weights) and elsewhere where both store the same bytes format, within
    ``budget`` bytes read. Sorted: structural differences first, then by relative error."""
    out: list[TensorDiff] = []
    same_fmt = (ck.config.is_fp8, ck.config.quant and ck.config.quant.scale_fmt) == (
        ref.config.is_fp8,
        ref.config.quant and ref.config.quant.scale_fmt,
    )
    mtp_c, mtp_r = has_mtp_tensors(ck), has_mtp_tensors(ref)

    def relevant(name: str, other_has: bool) -> bool:
        if name.endswith("_scale_inv") and ck.config.is_fp8 != ref.config.is_fp8:
            return False
        layer = N.parse_hf(name).layer
        return not (layer is not None and ck.config.is_mtp_layer(layer) and not other_has)

    for name in ref.tensors:
        if name not in ck.tensors and relevant(name, mtp_c):
            out.append(TensorDiff(name, "missing", "in the reference checkpoint, not in this one"))
    for name in ck.tensors:
        if name not in ref.tensors and relevant(name, mtp_r):
            out.append(TensorDiff(name, "extra", "in this checkpoint, not in the reference"))
    common = [n for n in ck.tensors if n in ref.tensors]
    for name in common:
        a, b = ck.full_shape(name), ref.full_shape(name)
        if a != b:
            out.append(TensorDiff(name, "shape", f"{list(a)} vs reference {list(b)}"))
    structural = {d.name for d in out}

    def layer_of(name: str) -> int | None:
        return N.parse_hf(name).layer

    focus = [n for n in common if layer_of(n) in layers and n not in structural]
    rest = [n for n in common if layer_of(n) not in layers and n not in structural]
    spent = 0
    values: list[TensorDiff] = []
    for name in focus + rest:
        in_focus = layer_of(name) in layers
        ia, ib = ck.tensors[name], ref.tensors[name]
        exact_fmt = same_fmt and ia.dtype == ib.dtype
        if not in_focus and (not exact_fmt or spent > budget):
            continue
        if name.endswith("_scale_inv"):
            if exact_fmt and not torch.equal(ck.read(name), ref.read(name)):
                s, r = ck.read(name).double(), ref.read(name).double()
                bad = (s != r).nonzero()
                where = [int(x) for x in bad[0]]
                values.append(
                    TensorDiff(
                        name,
                        "value",
                        f"{len(bad)} scale block(s) differ, first at {where}",
                        float((s - r).norm() / r.norm().clamp_min(1e-30)),
                    )
                )
            spent += ia.nbytes * 2
            continue
        if exact_fmt and torch.equal(ck.read(name), ref.read(name)):
            spent += ia.nbytes * 2
            continue
        a, b = _effective(ck, name), _effective(ref, name)
        spent += ia.nbytes + ib.nbytes
        if torch.equal(a, b):
            continue
        rel = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
        if rel != rel or rel > th.weight_tol or (exact_fmt and th.weight_tol == 0.0):
            idx = (a != b).nonzero()
            first = [int(x) for x in idx[0]] if len(idx) else []
            values.append(TensorDiff(name, "value", f"{len(idx)} of {a.numel()} values differ, first at {first}", rel))
    values.sort(key=lambda d: -(d.rel_err if d.rel_err == d.rel_err else float("inf")))
    return out + values


# ---------------------------------------------------------------------- the command


def planned_bytes(ckpt: str | Path, reference: str | Path | None = None, checksums: bool = False) -> int:
    """Bytes ``verify_checkpoint`` reports through ``progress`` (for a progress bar's total)."""
    total = 0
    for p in [ckpt] + ([reference] if reference is not None and Path(reference).is_dir() else []):
        try:
            ck = open_checkpoint(p, strict=False, read_config=False)
        except Dsv3Error:
            continue
        total += sum(_layer_bytes_noconfig(ck))
        if checksums and p == ckpt:
            man = read_manifest(p) or {}
            total += sum(r.get("size", 0) for r in man.get("files", {}).values() if isinstance(r, dict))
    return total


def _layer_bytes_noconfig(ck: Checkpoint) -> list[int]:
    return (
        [p.info.nbytes for ps in ck.mp_parts.values() for p in ps]
        if ck.layout == "mp"
        else [i.nbytes for i in ck.tensors.values()]
    )


def _open(path: str | Path) -> tuple[Checkpoint, list[dict]]:
    """Open leniently; a broken config is a structural problem (the tensors are still read without it)."""
    try:
        return open_checkpoint(path, strict=False), []
    except ConfigError as e:
        ck = open_checkpoint(path, strict=False, read_config=False)
        return ck, [_problem("config", str(e), "config.json")]


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}.get(str(dtype))
    if d is None:
        raise Dsv3Error(f"--dtype must be float32, float64 or bfloat16, got {dtype!r}")
    return d


def verify_checkpoint(
    ckpt: str | Path,
    *,
    reference: str | Path | None = None,
    save_reference: str | Path | None = None,
    prompts: list[str] | None = None,
    tokens: list[list[int]] | None = None,
    device: str = "cpu",
    engine: str = "torch",
    gemm: str = "bf16",
    stream: bool | None = None,
    mtp: bool = False,
    checksums: bool = False,
    thresholds: Thresholds | dict | None = None,
    tier: str | None = None,
    topk: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Progress | None = None,
    log: Log | None = None,
) -> VerifyReport:
    """Check ``ckpt`` structurally, run it on prompts and compare with ``reference`` (a reference file or a
    checkpoint folder), and/or write a reference file to ``save_reference``.

    ``thresholds``: a full ``Thresholds`` or a dict of limits overriding the automatically chosen tier's
    (``tier`` forces the tier). Raises ``Dsv3Error`` for bad input; a failing checkpoint is a report with
    ``verdict == "fail"``.
    """
    check_device(device)
    t_start = time.perf_counter()
    say = log or (lambda s: None)
    dtype = _as_dtype(dtype)
    if reference is not None and save_reference is not None:
        raise Dsv3Error("--reference and --save-reference are exclusive: save a reference once, then compare with it")
    if prompts is not None and tokens is not None:
        raise Dsv3Error("--prompts and --tokens are exclusive")
    if tier is not None and tier not in TIERS:
        raise Dsv3Error(f"--tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if gemm not in ("bf16", "fp8") or engine not in ("torch", "triton"):
        raise Dsv3Error(f"--gemm must be bf16 or fp8 and --engine torch or triton (got {gemm!r}, {engine!r})")
    if topk is not None and topk < 1:
        raise Dsv3Error("--topk must be >= 1")
    rank, world = dist_info()
    ck, cfg_problems = _open(ckpt)
    rep = VerifyReport(str(ckpt), ck.layout, ck.world)
    if world > 1 and (ck.layout != "mp" or ck.world != world):
        what = f"an MP-{ck.world} checkpoint" if ck.layout == "mp" else f"a {ck.layout} checkpoint"
        fix = f"run one process per rank file (--nproc-per-node {ck.world})" if ck.layout == "mp" else "shard it first"
        raise ShardingError(f"torchrun started {world} processes but {ckpt} is {what}: {fix}")

    # -- structure
    t0 = time.perf_counter()
    problems, warnings = check_structure(ck, checksums=checksums, progress=progress)
    problems = cfg_problems + problems
    if checksums:
        rep.checksums, cp = check_checksums(ck, progress)
        problems += cp
        if not rep.checksums["sources"]:
            warnings.append(f"--checksums: no {MANIFEST_NAME} and no Hub download metadata to check against")
    if world > 1:  # every rank checked its own file: all of them report everything found
        problems = _gather_problems(problems)
    rep.problems, rep.warnings = problems, warnings
    rep.seconds["structure"] = round(time.perf_counter() - t0, 3)
    say(f"structure: {len(problems)} problem(s), {len(warnings)} warning(s)")
    cfg = ck.config

    # -- the reference and the prompts (bad input raises before any model runs)
    ref_obj: Reference | None = None
    ref_ck: Checkpoint | None = None
    if reference is not None:
        rep.reference = str(reference)
        if Path(reference).is_dir():
            if world > 1:
                raise Dsv3Error(
                    "under torchrun the reference must be a file (--save-reference it in one process first)"
                )
            ref_ck, ref_cfg_problems = _open(reference)
            rep.reference_kind = "checkpoint"
            if ref_ck.config is None or ref_cfg_problems:
                raise ReferenceError(f"{reference}: the reference checkpoint has no usable config")
            bad = [p for p in ref_ck.problems if p.kind not in _RUNNABLE_KINDS]
            if bad:
                raise ReferenceError(f"{reference}: the reference checkpoint is broken: {bad[0]}")
        else:
            ref_obj = load_reference(reference)
            rep.reference_kind = "file"
    if cfg is None:
        rep.verdict = "fail"
        rep.failures.append("no usable config: the numeric check cannot run")
        rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
        return rep
    if ref_obj is not None:
        if prompts is not None or tokens is not None:
            raise Dsv3Error("the prompts come from the reference file; drop --prompts/--tokens")
        if ref_obj.meta.get("checkpoint", {}).get("geometry_digest") != geometry_digest(cfg):
            raise ReferenceError(f"{reference} was made from a model of another geometry than {ckpt}")
        ids = ref_obj.ids
        if ref_obj.projection.shape[0] != cfg.hidden_size:
            raise ReferenceError(f"{reference}: projection is for hidden size {ref_obj.projection.shape[0]}")
        projection = ref_obj.projection
    else:
        if ref_ck is not None and geometry_digest(ref_ck.config) != geometry_digest(cfg):
            raise ReferenceError(f"{reference} is a model of another geometry than {ckpt}")
        if tokens is not None:
            ids = [list(r) for r in tokens]
        elif prompts is not None:
            ids = tokenize(ck.path, list(prompts))
        else:
            ids = default_ids(ck.path, cfg.vocab_size)
        projection = make_projection(cfg.hidden_size)
    _check_ids(ids, cfg.vocab_size)
    do_mtp = mtp and has_mtp_tensors(ck)
    if mtp and not do_mtp:
        warnings.append("--mtp: this checkpoint has no MTP module; MTP logits not checked")
    if do_mtp and ref_obj is not None and not ref_obj.has_mtp:
        warnings.append("--mtp: the reference file has no MTP logits; MTP not compared")
    if do_mtp and ref_ck is not None and not has_mtp_tensors(ref_ck):
        warnings.append("--mtp: the reference checkpoint has no MTP module; MTP not compared")

    blocking = [p for p in problems if p["kind"] not in _RUNNABLE_KINDS]
    if blocking:
        rep.verdict = "fail"
        rep.failures.append(f"{len(blocking)} structural problem(s) keep the model from loading; numeric check skipped")
        rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
        return rep

    # -- run
    plan = memory_plan(ck, ids, device=device, stream=stream, dtype=dtype, gemm=gemm)
    rep.memory = plan
    say(_plan_line(plan, sum(len(r) for r in ids), len(ids)))
    kw = dict(device=device, engine=engine, gemm=gemm, stream=plan.mode == "stream", dtype=dtype, projection=projection)
    try:
        cand = _run(ck, ids, mtp=do_mtp, progress=progress, **kw)
    except CheckpointError as e:  # a tensor the structural pass could not see (e.g. truncated data)
        rep.problems.append(e.as_dict())
        rep.verdict = "fail"
        rep.failures.append(f"the model could not load this checkpoint: {e}")
        rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
        return rep
    rep.run = cand.meta["run"]
    rep.seconds["model"] = round(cand.seconds, 3)
    say(f"model: {len(ids)} prompt(s), {sum(len(r) for r in ids)} tokens in {cand.seconds:.2f} s")

    nonfinite = [i for i, r in enumerate(cand.records) if not bool(torch.isfinite(r.logits.full).all())]
    if nonfinite:
        rep.failures.append(f"non-finite logits in prompt(s) {nonfinite}")
        rep.divergence = localize_nonfinite(cand.records)
    if save_reference is not None:
        if problems or nonfinite:  # a reference must come from a checkpoint that passes its own checks
            rep.failures.append(f"reference not written to {save_reference}: this checkpoint fails its own checks")
        else:
            recs = [
                PromptRecord(
                    r.ids,
                    Logits.from_full(r.logits.full, topk),
                    r.hidden_norm,
                    r.hidden_proj,
                    Logits.from_full(r.mtp.full, topk) if r.mtp is not None else None,
                )
                for r in cand.records
            ]
            meta = cand.meta | {"logits": {"mode": "topk" if topk else "full", "k": topk}}
            if rank == 0:
                size = write_reference(save_reference, Reference(recs, projection, cand.probe, meta))
                say(f"reference: wrote {save_reference} ({size} bytes)")
            rep.saved_reference = str(save_reference)

    if ref_obj is None and ref_ck is None:
        if problems:
            rep.failures.append(f"{len(problems)} structural problem(s)")
        rep.verdict = "fail" if rep.failures else "pass"
        rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
        return rep

    # -- compare
    if ref_ck is not None:
        ref_run = _run(ref_ck, ids, mtp=do_mtp and has_mtp_tensors(ref_ck), progress=progress, **kw)
        ref_records, ref_meta, ref_probe = ref_run.records, ref_run.meta, ref_run.probe
    else:
        ref_records, ref_meta, ref_probe = ref_obj.prompts, ref_obj.meta, ref_obj.probe
    probe = probe_difference(ref_probe, cand.probe) if ref_probe and cand.probe else None
    auto, reasons = choose_tier(ref_meta, cand.meta, probe)
    rep.tier = tier or auto
    rep.tier_reasons = reasons + ([f"tier forced to {tier} (automatic: {auto})"] if tier and tier != auto else [])
    if isinstance(thresholds, Thresholds):
        th = thresholds
    else:
        unknown = set(thresholds or {}) - {f.name for f in fields(Thresholds)} | ({"tier"} & set(thresholds or {}))
        if unknown:
            raise Dsv3Error(f"unknown threshold(s): {', '.join(sorted(unknown))}")
        th = TIERS[rep.tier].override(**(thresholds or {}))
    rep.thresholds = th.as_dict()

    per, per_mtp = [], []
    for i, (r, c) in enumerate(zip(ref_records, cand.records)):
        m = compare_logits(r.logits, c.logits.full)
        per.append(m)
        st = summarize([m])
        mst = None
        if do_mtp and r.mtp is not None and c.mtp is not None:
            mm = compare_logits(r.mtp, c.mtp.full)
            per_mtp.append(mm)
            mst = summarize([mm])
        fails = st.failures(th) + ([f"MTP: {f}" for f in mst.failures(th.for_mtp())] if mst else [])
        rep.prompts.append(PromptResult(i, len(r.ids), st, mst, fails))
    rep.overall = summarize(per)
    rep.failures += rep.overall.failures(th)
    if per_mtp:
        rep.mtp_overall = summarize(per_mtp)
        rep.failures += [f"MTP: {f}" for f in rep.mtp_overall.failures(th.for_mtp())]
    if problems:
        rep.failures.append(f"{len(problems)} structural problem(s)")
    rep.verdict = "fail" if rep.failures else "pass"
    if rep.verdict == "fail" and (
        rep.overall.failures(th) or (rep.mtp_overall and rep.mtp_overall.failures(th.for_mtp()))
    ):
        distributed = max(ref_meta["run"].get("world", 1), cand.meta["run"]["world"]) > 1
        skip = frozenset({0}) if distributed else frozenset()
        rep.divergence = localize(ref_records, cand.records, th.hidden_tol, cfg, skip)
        if not rep.overall.failures(th) and rep.mtp_overall is not None:
            rep.divergence.where = f"the MTP module (model.layers.{cfg.num_hidden_layers})"
        if ref_ck is not None:
            d = rep.divergence
            focus = [d.layer if d.layer is not None and d.layer >= 0 else None]
            if rep.divergence.where.startswith("the MTP"):
                focus = [cfg.num_hidden_layers]
            rep.tensor_diffs = compare_tensors(ck, ref_ck, focus, th)
            rep.suspect_files = _files_of(ck, rep.tensor_diffs)
    rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
    return rep


def _files_of(ck: Checkpoint, diffs: list[TensorDiff]) -> dict[str, int]:
    """Which files of ``ck`` hold the differing tensors (in the MP layout, every rank file holding a piece)."""
    out: dict[str, int] = {}
    for d in diffs:
        if d.name not in ck.tensors:
            continue
        infos = [p.info for p in ck.mp_parts[d.name]] if ck.layout == "mp" else [ck.tensors[d.name]]
        for i in infos:
            out[i.file] = out.get(i.file, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def localize_nonfinite(records: list[PromptRecord]) -> Divergence:
    """Without a reference: the first hidden-state row that is not finite."""
    R = records[0].hidden_norm.shape[0]
    for k in range(R):
        for i, r in enumerate(records):
            row = r.hidden_norm[k]
            if bool((~torch.isfinite(row) & ~torch.isnan(row)).any()) or (k > 0 and bool(torch.isnan(row).any())):
                pos = int((~torch.isfinite(row)).nonzero()[0])
                where = "embedding (model.embed_tokens)" if k == 0 else f"layer {k - 1} (model.layers.{k - 1})"
                return Divergence(k - 1, where, float("inf"), i, pos)
    return Divergence(None, "after the last layer (model.norm / lm_head)", float("inf"))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _plan_line(p: MemoryPlan, tokens: int, n: int) -> str:
    avail = human_bytes(p.available_bytes)
    layer = (
        f"largest layer {p.largest_layer}: {human_bytes(p.largest_layer_bytes)}" if p.largest_layer is not None else ""
    )
    return (
        f"memory plan: {p.mode} on {p.device}: peak ~{human_bytes(p.peak_bytes)} of {avail} available "
        f"(weights {human_bytes(p.weights_bytes)}, {layer}, embedding+head {human_bytes(p.top_bytes)}, "
        f"activations for {n} prompt(s) / {tokens} tokens {human_bytes(p.activation_bytes)})"
    )
