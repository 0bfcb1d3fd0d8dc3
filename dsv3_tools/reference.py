"""The verify reference file: what a checkpoint computed on a set of prompts, kept to compare later runs with.

One safetensors file (written atomically) holding, per prompt ``i``:

- ``prompt.{i}.ids``             I64 [T]        input token ids
- ``prompt.{i}.logits``          F32 [T, V]     every position's logits (full mode), or in top-k mode
  ``prompt.{i}.topk.values``     F32 [T, k]     the k largest logits per position, descending,
  ``prompt.{i}.topk.indices``    I32 [T, k]     their token ids,
  ``prompt.{i}.lse``             F64 [T]        logsumexp of the full logits row (so top-k log-probs are exact)
- ``prompt.{i}.mtp.*``           the same for the MTP logits (T - 1 rows), when recorded
- ``prompt.{i}.hidden.norm``     F32 [R, T]     L2 norm of the residual stream per position, R = 1 + layers
  ``prompt.{i}.hidden.proj``     F32 [R, T, P]  the residual stream projected on ``projection``; row 0 is the
                                                embedding output, row 1 + L the output of decoder layer L
and, once:

- ``projection``                 F32 [H, P]     fixed random Gaussian matrix / sqrt(P) (seed in the metadata)
- ``probe.{L}``                  BF16 [n, H]    effective (dequantized) weights of rows 0, 128, 256 ... of layer L's
                                                ``kv_a_proj_with_mqa``: one row of every block row, which tells
                                                "same effective weights" from "re-quantized" without reading more
- metadata ``dsv3_verify``: one JSON string (tool version, checkpoint fingerprint, precision path, device ...).

Comparing with it: logit and hidden-state metrics, and the pass/fail thresholds (tiers) that judge them.

KL divergence is ``KL(P_ref || P_cand)`` per position, computed in float64 from log-softmax. When the reference
keeps only the top-k logits per position (``--topk``), the distributions are compared on k + 1 outcomes: the k
reference tokens, with exact probabilities (the reference also stores each row's logsumexp), and one "every other
token" bucket holding the remaining mass. That is the KL of the two distributions coarsened the same way, never
more than the full KL (data-processing inequality), and equal to it when the rest of the vocabulary holds no mass.
Cosine similarity and the largest absolute difference are then taken over the k reference tokens only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import Dsv3Error
from .writer import SafetensorsWriter

FORMAT = "dsv3-verify-reference"
FORMAT_VERSION = 1
META_KEY = "dsv3_verify"
PROJ_DIM = 32
PROJ_SEED = 20261129


class ReferenceError(Dsv3Error):
    """A reference file that is missing, unreadable, or made for another model."""


@dataclass
class Logits:
    """Logits of every position: the full rows, or the top-k per row with each row's logsumexp."""

    full: torch.Tensor | None = None  # [T, V] f32
    values: torch.Tensor | None = None  # [T, k] f32, descending
    indices: torch.Tensor | None = None  # [T, k] int64
    lse: torch.Tensor | None = None  # [T] f64

    @classmethod
    def from_full(cls, logits: torch.Tensor, topk: int | None = None) -> Logits:
        logits = logits.detach().to("cpu", torch.float32).contiguous()
        if topk is None or topk >= logits.shape[-1]:
            return cls(full=logits)
        v, i = torch.topk(logits, topk, dim=-1, sorted=True)
        return cls(values=v.contiguous(), indices=i.to(torch.int64), lse=torch.logsumexp(logits.double(), dim=-1))

    @property
    def is_topk(self) -> bool:
        return self.full is None

    @property
    def rows(self) -> int:
        return int((self.full if self.full is not None else self.values).shape[0])


@dataclass
class PromptRecord:
    ids: torch.Tensor  # [T] int64
    logits: Logits
    hidden_norm: torch.Tensor  # [R, T] f32 (NaN where not recorded)
    hidden_proj: torch.Tensor  # [R, T, P] f32
    mtp: Logits | None = None


@dataclass
class Reference:
    """An in-memory reference: per-prompt records, the projection, the weight probe and the metadata."""

    prompts: list[PromptRecord]
    projection: torch.Tensor  # [H, P]
    probe: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, H] bf16
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[list[int]]:
        return [p.ids.tolist() for p in self.prompts]

    @property
    def has_mtp(self) -> bool:
        return bool(self.prompts) and all(p.mtp is not None for p in self.prompts)


def make_projection(hidden: int, dim: int = PROJ_DIM, seed: int = PROJ_SEED) -> torch.Tensor:
    """The fixed random projection [hidden, dim] used for hidden-state summaries (CPU generator: reproducible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((hidden, dim), generator=g, dtype=torch.float32) / math.sqrt(dim)


def _logits_entries(prefix: str, lg: Logits) -> list[tuple[str, torch.Tensor]]:
    if lg.full is not None:
        return [(f"{prefix}logits", lg.full)]
    return [
        (f"{prefix}topk.values", lg.values),
        (f"{prefix}topk.indices", lg.indices.to(torch.int32)),
        (f"{prefix}lse", lg.lse.double()),
    ]


def save_reference(path: str | Path, ref: Reference) -> int:
    """Write ``ref`` to ``path`` atomically (temporary name, fsync, rename); return the file size."""
    path = Path(path)
    if path.is_dir():
        raise ReferenceError(f"{path} is a folder; --save-reference takes a file name")
    if not path.parent.is_dir():
        raise ReferenceError(f"{path.parent}: no such folder")
    tensors: list[tuple[str, torch.Tensor]] = [("projection", ref.projection)]
    for i, p in enumerate(ref.prompts):
        pre = f"prompt.{i}."
        tensors.append((pre + "ids", p.ids.to(torch.int64)))
        tensors += _logits_entries(pre, p.logits)
        if p.mtp is not None:
            tensors += _logits_entries(pre + "mtp.", p.mtp)
        tensors.append((pre + "hidden.norm", p.hidden_norm.float()))
        tensors.append((pre + "hidden.proj", p.hidden_proj.float()))
    for layer, rows in sorted(ref.probe.items()):
        tensors.append((f"probe.{layer}", rows.to(torch.bfloat16)))
    from .stfile import dtype_name

    tensors = [(n, t.detach().to("cpu").contiguous()) for n, t in tensors]
    meta = dict(ref.meta) | {"format": FORMAT, "format_version": FORMAT_VERSION, "prompts": len(ref.prompts)}
    entries = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors]
    w = SafetensorsWriter(path, entries, {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
    try:
        for n, t in tensors:
            w.write(n, t)
        return w.finish().size
    except BaseException:
        w.abort()
        raise


def is_reference_file(path: str | Path) -> bool:
    """True when ``path`` is a file whose safetensors metadata marks it as a verify reference."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        from .stfile import read_header

        return META_KEY in read_header(p).metadata
    except Dsv3Error:
        return False


def load_reference(path: str | Path) -> Reference:
    """Read a reference file written by ``save_reference``; raise ``ReferenceError`` naming what is wrong."""
    from .stfile import read_header, torch_dtype

    p = Path(path)
    if not p.is_file():
        raise ReferenceError(f"{p}: no such reference file")
    try:
        hdr = read_header(p)
    except Dsv3Error as e:
        raise ReferenceError(f"{p}: not a readable safetensors file ({e})") from None
    raw_meta = hdr.metadata.get(META_KEY)
    if raw_meta is None:
        raise ReferenceError(f"{p}: not a dsv3-tools verify reference (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise ReferenceError(f"{p}: corrupt reference metadata") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ReferenceError(f"{p}: reference format {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    tensors: dict[str, torch.Tensor] = {}
    with open(p, "rb") as f:
        for name, info in hdr.tensors.items():
            f.seek(info.start)
            buf = bytearray(info.nbytes)
            if f.readinto(buf) != info.nbytes:
                raise ReferenceError(f"{p}: truncated at tensor {name!r}")
            t = torch.frombuffer(buf, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
            tensors[name] = t.view(torch_dtype(info.dtype)).reshape(info.shape)

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ReferenceError(f"{p}: tensor {name!r} missing from the reference")
        return tensors[name]

    def logits(prefix: str) -> Logits | None:
        if prefix + "logits" in tensors:
            return Logits(full=tensors[prefix + "logits"].float())
        if prefix + "topk.values" in tensors:
            return Logits(
                values=need(prefix + "topk.values").float(),
                indices=need(prefix + "topk.indices").to(torch.int64),
                lse=need(prefix + "lse").double(),
            )
        return None

    prompts = []
    for i in range(int(meta.get("prompts", 0))):
        pre = f"prompt.{i}."
        lg = logits(pre)
        if lg is None:
            raise ReferenceError(f"{p}: prompt {i} has no logits")
        ids = need(pre + "ids").to(torch.int64)
        if lg.rows != ids.numel():
            raise ReferenceError(f"{p}: prompt {i} has {ids.numel()} ids but {lg.rows} logits rows")
        prompts.append(
            PromptRecord(ids, lg, need(pre + "hidden.norm"), need(pre + "hidden.proj"), logits(pre + "mtp."))
        )
    if not prompts:
        raise ReferenceError(f"{p}: the reference holds no prompts")
    probe = {int(n.split(".")[1]): t for n, t in tensors.items() if n.startswith("probe.")}
    return Reference(prompts, need("projection").float(), probe, meta)


# ---------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one kind of comparison (a "tier"); ``None`` means the metric is reported, not judged."""

    tier: str
    min_top1: float  # fraction of positions whose argmax agrees
    max_kl_mean: float  # mean KL(P_ref || P_cand) over positions, nats
    max_kl: float  # worst position's KL
    min_cos: float  # worst position's cosine similarity of the logits
    max_rel_diff: float | None  # largest |logit difference| / largest |reference logit|
    hidden_tol: float  # relative hidden-state error above which a layer is said to diverge
    weight_tol: float  # relative Frobenius error of effective weights above which a tensor is said to differ

    def override(self, **kw: float | None) -> Thresholds:
        """These thresholds with some limits replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)

    def for_mtp(self) -> Thresholds:
        """Limits for the MTP logits: one more block on top of the main model's already-perturbed hidden state.

        Identical in the exact tier; elsewhere the agreement limits are halved and the KL limits doubled.
        """
        if self.tier == "exact":
            return self
        return replace(
            self,
            min_top1=self.min_top1 / 2,
            max_kl_mean=self.max_kl_mean * 2,
            max_kl=self.max_kl * 2,
            min_cos=self.min_cos - (1 - self.min_cos),
        )


# The tiers. "exact": same effective weights and the same arithmetic (device, engine, gemm, dtype, one process):
# logits are expected to be bit-identical; the limits leave room only for float32 rounding.
# "float": same effective weights, different arithmetic (CPU vs GPU, another engine or dtype, all-reduce order
# under torchrun): float rounding, amplified at the odd position where a router choice flips at a near-tie.
# "quantized": the weights were re-quantized, or a side ran the FP8 GEMM path (activations quantized online).
# Measured on the tiny model (README, verify section): its random router makes it far more sensitive than a
# trained model (a 2^-9 relative change of some weights already moves some positions' logits to cosine 0.8), so
# these limits separate "within quantization noise" from "different weights" (KL 1.0, top-1 0.0) only coarsely.
TIERS: dict[str, Thresholds] = {
    "exact": Thresholds("exact", 0.99, 1e-9, 1e-7, 0.999999, 1e-5, 1e-5, 0.0),
    "float": Thresholds("float", 0.98, 1e-4, 5e-2, 0.99, None, 1e-3, 0.0),
    "quantized": Thresholds("quantized", 0.5, 0.15, 1.0, 0.4, None, 0.5, 0.1),
}


# ---------------------------------------------------------------------- logits


@dataclass
class LogitStats:
    """Agreement of candidate logits with the reference over a set of positions."""

    positions: int
    top1: float
    kl_mean: float
    kl_max: float
    cos_mean: float
    cos_min: float
    max_abs_diff: float
    max_rel_diff: float
    identical: bool  # every compared logit bit-identical
    worst_position: int | None = None  # position of the largest KL (within a prompt)

    def failures(self, th: Thresholds) -> list[str]:
        """The limits this fails, as short readable strings (NaN fails everything)."""
        out = []

        def le(x: float, lim: float) -> bool:
            return not math.isnan(x) and x <= lim

        def ge(x: float, lim: float) -> bool:
            return not math.isnan(x) and x >= lim

        if not ge(self.top1, th.min_top1):
            out.append(f"top-1 agreement {self.top1:.4f} < {th.min_top1}")
        if not le(self.kl_mean, th.max_kl_mean):
            out.append(f"mean KL {self.kl_mean:.3e} > {th.max_kl_mean:.0e}")
        if not le(self.kl_max, th.max_kl):
            out.append(f"max KL {self.kl_max:.3e} > {th.max_kl:.0e}")
        if not ge(self.cos_min, th.min_cos):
            out.append(f"min cosine {self.cos_min:.6f} < {th.min_cos}")
        if th.max_rel_diff is not None and not le(self.max_rel_diff, th.max_rel_diff):
            out.append(f"max |diff| / logit scale {self.max_rel_diff:.3e} > {th.max_rel_diff:.0e}")
        return out


@dataclass
class PositionMetrics:
    """Per-position comparison results of one prompt (kept to aggregate over prompts)."""

    kl: torch.Tensor  # [T] f64
    match: torch.Tensor  # [T] bool
    cos: torch.Tensor  # [T] f64
    abs_diff: torch.Tensor  # [T] f64, max |diff| per position
    scale: torch.Tensor  # [T] f64, max |reference logit| per position
    identical: bool


def compare_logits(ref: Logits, cand: torch.Tensor) -> PositionMetrics:
    """Compare candidate logits [T, V] (full rows) with a reference (full or top-k)."""
    cand = cand.detach().to("cpu", torch.float64)
    lq = torch.log_softmax(cand, dim=-1)
    if ref.full is not None:
        r = ref.full.to(torch.float64)
        if r.shape != cand.shape:
            raise ValueError(f"reference logits {list(r.shape)} vs candidate {list(cand.shape)}")
        lp = torch.log_softmax(r, dim=-1)
        p = lp.exp()
        # 0 * log 0 terms are 0: where p underflows the product is 0 already; guard against inf - inf = nan.
        kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
        match = r.argmax(-1) == cand.argmax(-1)
        cos = torch.nn.functional.cosine_similarity(r, cand, dim=-1).clamp(-1.0, 1.0)
        diff = (r - cand).abs().amax(-1)
        scale = r.abs().amax(-1)
        identical = torch.equal(ref.full, cand.float())
    else:
        idx = ref.indices
        v = ref.values.to(torch.float64)
        lp_k = v - ref.lse.to(torch.float64)[:, None]
        p_k = lp_k.exp()
        lq_k = lq.gather(-1, idx)
        kl = (p_k * (lp_k - lq_k)).sum(-1)
        # The rest of the vocabulary as one outcome: the reference's remaining mass from its stored logsumexp, the
        # candidate's exactly from the logits outside the top-k set.
        tail_p = (1.0 - p_k.sum(-1)).clamp_min(0.0)
        rest = lq.scatter(-1, idx, float("-inf"))
        ltail_q = torch.logsumexp(rest, dim=-1)
        tail_term = torch.where(
            tail_p > 0, tail_p * (torch.log(tail_p.clamp_min(1e-300)) - ltail_q), torch.zeros_like(tail_p)
        )
        kl = kl + tail_term
        match = idx[:, 0] == cand.argmax(-1)
        c_k = cand.gather(-1, idx)
        cos = torch.nn.functional.cosine_similarity(v, c_k, dim=-1).clamp(-1.0, 1.0)
        diff = (v - c_k).abs().amax(-1)
        scale = v.abs().amax(-1)
        identical = torch.equal(ref.values, c_k.float())
    return PositionMetrics(kl.clamp_min(0.0), match, cos, diff, scale, identical)


def summarize(items: list[PositionMetrics]) -> LogitStats:
    """Aggregate per-position metrics of one or several prompts."""
    if not items:
        return LogitStats(0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), 0.0, 0.0, True)
    kl = torch.cat([m.kl for m in items])
    match = torch.cat([m.match for m in items])
    cos = torch.cat([m.cos for m in items])
    n = int(kl.numel())
    if n == 0:
        return LogitStats(0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, True)
    rel = max(_rel(m) for m in items)
    absd = max(float(m.abs_diff.max()) if m.abs_diff.numel() else 0.0 for m in items)
    return LogitStats(
        positions=n,
        top1=float(match.double().mean()),
        kl_mean=_nanmax_guard(kl, kl.mean()),
        kl_max=_nanmax_guard(kl, kl.max()),
        cos_mean=_nanmax_guard(cos, cos.mean()),
        cos_min=_nanmax_guard(cos, cos.min()),
        max_abs_diff=absd,
        max_rel_diff=rel,
        identical=all(m.identical for m in items),
        worst_position=int(torch.nan_to_num(kl, nan=float("inf")).argmax()) if len(items) == 1 else None,
    )


def _nanmax_guard(x: torch.Tensor, value: torch.Tensor) -> float:
    """``value``, or NaN when any entry of ``x`` is NaN (min/max would otherwise hide it)."""
    return float("nan") if bool(torch.isnan(x).any()) else float(value)


def _rel(m: PositionMetrics) -> float:
    if not m.abs_diff.numel():
        return 0.0
    d = float(m.abs_diff.max())
    if math.isnan(d) or bool(torch.isnan(m.abs_diff).any()):
        return float("nan")
    s = float(m.scale.max())
    return d / s if s > 0 else (0.0 if d == 0 else float("inf"))


# ---------------------------------------------------------------------- hidden states


def hidden_errors(
    ref_norm: torch.Tensor, ref_proj: torch.Tensor, cand_norm: torch.Tensor, cand_proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per summary row (embedding, then each layer): the worst relative error over positions, and where.

    The error of one position is the larger of the relative difference of the residual stream's norm and the
    relative distance of its random projections (which tracks the relative distance of the full vectors). Rows
    not recorded on either side (NaN) give NaN.
    """
    rn, cn = ref_norm.double(), cand_norm.double()
    rp, cp = ref_proj.double(), cand_proj.double()
    tiny = 1e-30
    e_norm = (rn - cn).abs() / rn.abs().clamp_min(tiny)
    e_proj = (rp - cp).norm(dim=-1) / rp.norm(dim=-1).clamp_min(tiny)
    e = torch.maximum(e_norm, e_proj)  # NaN propagates
    e = torch.where(torch.isnan(rn) & torch.isnan(cn), torch.full_like(e, float("nan")), e)
    e = torch.where(torch.isnan(rn) ^ torch.isnan(cn), torch.full_like(e, float("nan")), e)
    if e.shape[1] == 0:
        return torch.zeros(e.shape[0], dtype=torch.float64), torch.zeros(e.shape[0], dtype=torch.int64)
    # A NaN in the candidate where the reference is finite is a divergence, not a gap.
    bad = torch.isnan(cn) & ~torch.isnan(rn)
    e = torch.where(bad, torch.full_like(e, float("inf")), e)
    filled = torch.nan_to_num(e, nan=-1.0)
    worst, pos = filled.max(dim=1)
    worst = torch.where(worst < 0, torch.full_like(worst, float("nan")), worst)
    return worst, pos
