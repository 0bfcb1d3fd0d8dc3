"""Running a checkpoint on prompts and keeping what a comparison needs: the logits of every position, a summary
of every layer's hidden states (and, to be a reference, the hidden states themselves), a weight probe and the
run's metadata, as a ``Reference``; a ``teacher`` hook also runs each layer on a reference's inputs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch

from .. import names as N
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..runtime import dist_info
from ..stfile import TensorInfo, torch_dtype
from ..writer import TOOL_VERSION, source_fingerprint
from .memory import device_desc, layer_bytes
from .reference import PROJ_SEED, Logits, PromptRecord, Reference

if TYPE_CHECKING:
    from ..model import Teacher

Progress = Callable[[int], None]


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
    from ..kernels.weight_dequant import weight_dequant_ref

    cfg = ck.config
    rank, _ = dist_info()
    b0, b1 = cfg.block_size
    out = {}
    for L in cfg.main_layers:
        name = f"model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight"
        info = _local_info(ck, name, rank)
        sinfo = _local_info(ck, N.scale_name(name), rank) if info is not None and info.dtype == "F8_E4M3" else None
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


def has_mtp_tensors(ck: Checkpoint) -> bool:
    """Whether the checkpoint holds an MTP module (the config declares one and its tensors are there)."""
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


@dataclass(frozen=True)
class RunOptions:
    """How the model runs: the arithmetic (device, engine, GEMM path, dtype) and the memory mode."""

    device: str = "cpu"
    engine: str = "torch"
    gemm: str = "bf16"
    dtype: torch.dtype = torch.float32
    stream: bool = True


def run_checkpoint(
    ck: Checkpoint,
    ids: list[list[int]],
    opts: RunOptions,
    *,
    mtp: bool,
    projection: torch.Tensor,
    progress: Progress | None = None,
    keep_hidden: bool = False,
    teacher: Teacher | None = None,
) -> Reference:
    """Run the model on ``ids``: full logits of every position, per-layer hidden summaries, the weight probe and
    the run's metadata, as a ``Reference`` (what ``--save-reference`` writes, what a comparison takes).

    ``keep_hidden``: also keep every layer's input hidden states (a reference others are teacher-forced on);
    ``teacher``: the model's teacher-forcing hook, called as each layer is loaded."""
    from ..model import run_model

    cfg = ck.config
    rank, world = dist_info()
    L = cfg.num_hidden_layers
    P = projection.shape[1]
    norms = [torch.full((L + 1, len(r)), float("nan")) for r in ids]
    projs = [torch.full((L + 1, len(r), P), float("nan")) for r in ids]
    # Stored as computed (bf16 stays bf16), so that a layer fed this input reproduces this run's output exactly.
    keep = torch.bfloat16 if opts.dtype == torch.bfloat16 else torch.float32
    full = [torch.full((L + 1, len(r), cfg.hidden_size), float("nan"), dtype=keep) for r in ids] if keep_hidden else []
    if world == 1:  # the embedding summary reads rows of every rank's file: single process only
        for i, r in enumerate(ids):
            e = _embedding_rows(ck, r)
            norms[i][0], projs[i][0] = e.norm(dim=-1), e @ projection
            if keep_hidden:
                full[i][0] = e.to(opts.dtype)  # the model's own rounding of the embedding to the compute dtype
    lbytes = layer_bytes(ck)

    def on_layer(layer: int, hidden: list[torch.Tensor]) -> None:
        for i, h in enumerate(hidden):
            h = h.detach().to("cpu", torch.float32)
            norms[i][1 + layer] = h.norm(dim=-1)
            projs[i][1 + layer] = h @ projection
            if keep_hidden:
                full[i][1 + layer] = h
        if progress:
            progress(lbytes.get(layer, 0))

    device, engine, gemm, dtype, stream = opts.device, opts.engine, opts.gemm, opts.dtype, opts.stream
    t0 = time.perf_counter()
    out = run_model(
        ck, ids, device=device, engine=engine, gemm=gemm, stream=stream, mtp=mtp, on_layer=on_layer, dtype=dtype,
        teacher=teacher,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if progress:
        progress(sum(v for k, v in lbytes.items() if k is None or k >= L))
    records = []
    for i, r in enumerate(ids):
        lg = out.logits[i]
        if tuple(lg.shape) != (len(r), cfg.vocab_size):
            raise AssertionError(f"run_model returned logits {list(lg.shape)} for a {len(r)}-token prompt")
        m = Logits.from_full(out.mtp_logits[i]) if mtp and out.mtp_logits is not None else None
        ids_i = torch.tensor(r, dtype=torch.int64)
        records.append(PromptRecord(ids_i, Logits.from_full(lg), norms[i], projs[i], m, full[i] if full else None))
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
            "device": device_desc(device),
            "engine": engine,
            "gemm": gemm if q else "bf16",  # a BF16 checkpoint has no FP8 GEMM path
            "dtype": str(dtype).removeprefix("torch."),
            "world": world,
            "stream": stream,
            "mtp": mtp,
        },
        "vocab_size": cfg.vocab_size,
        "hidden": {
            "rows": ["embedding"] + list(range(L)),
            "proj_dim": P,
            "proj_seed": PROJ_SEED,
            "full": str(keep).removeprefix("torch.") if keep_hidden else None,
        },
        "probe": {"tensor": "self_attn.kv_a_proj_with_mqa", "rows_every": cfg.block_size[0]},
        "seconds": round(seconds, 3),
    }
    return Reference(records, projection, weight_probe(ck), meta)
