"""The memory plan: what a verify run needs, estimated from the tensor sizes before anything is loaded, and
whether to stream the model layer by layer."""

from __future__ import annotations

import math

import torch

from .. import names as N
from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..runtime import available_bytes
from .result import MemoryPlan


def device_desc(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def layer_bytes(ck: Checkpoint) -> dict[int | None, int]:
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
        if N.is_scale(name):
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
    avail = available_bytes(device)
    if stream is None:
        stream = avail is not None and resident > 0.8 * avail
    return MemoryPlan(
        "stream" if stream else "resident",
        device_desc(device),
        avail,
        total,
        big,
        layers.get(big, 0),
        top,
        act,
        resident,
        streamed,
        len(ids),
        sum(len(r) for r in ids),
    )
