"""How a candidate's logits and hidden states compare with a reference's, and the limits (tiers) that judge them.

Each layer is also judged alone (teacher forcing): run on the reference's input of that layer, its output is
compared with the reference's output. Errors are taken relative to the layer's *update* (output - input, what the
layer adds to the residual stream), since that is what the layer computes: ``rel`` over every position, the worst
position's error against the update's RMS (``rel_max``), and the ``gain`` (the candidate's update projected on the
reference's: 1 when reproduced; a scale fault moves it, rounding noise averages out of it).

KL divergence is ``KL(P_ref || P_cand)`` per position, computed in float64 from log-softmax. When the reference
keeps only the top-k logits per position (``--topk``), the distributions are compared on k + 1 outcomes: the k
reference tokens, with exact probabilities (the reference also stores each row's logsumexp), and one "every other
token" bucket holding the remaining mass. That is the KL of the two distributions coarsened the same way, never
more than the full KL (data-processing inequality), and equal to it when the rest of the vocabulary holds no mass.
Cosine similarity and the largest absolute difference are then taken over the k reference tokens only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .reference import Logits

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
    hidden_tol: float  # relative hidden-state error above which a layer is said to diverge (no teacher forcing)
    weight_tol: float  # relative Frobenius error of effective weights above which a tensor is said to differ
    max_layer_err: float = 0.0  # teacher-forced layer: worst position's error / RMS of the reference layer's update
    max_gain_dev: float = 0.0  # teacher-forced layer: |gain - 1|

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
# logits and teacher-forced layers are expected to be bit-identical; the limits leave room only for float32
# rounding. "float": same effective weights, different arithmetic (CPU vs GPU, another engine or dtype, all-reduce
# order under torchrun). "quantized": the weights were re-quantized, or a side ran the FP8 GEMM path (activations
# quantized online) or computed in bfloat16.
# The float and quantized layer limits and the quantized logit limits are derived from the fault matrix
# (benchmarks/bench_verify_matrix.py; docs/verify.md gives the rule, the recorded run and the margins): each layer
# limit sits at the geometric midpoint between the worst clean conversion and the weakest planted fault it must
# catch; the quantized logit limits are 4x the worst clean deviation, on the well-conditioned ("trained") model.
# The float logit limits predate the matrix (set for CPU vs GPU runs of the random model; the matrix's float cases
# are 1e-12 from them). On the random-weight model the quantized limits fail clean conversions: it is chaotic.
TIERS: dict[str, Thresholds] = {
    "exact": Thresholds(
        "exact", min_top1=0.99, max_kl_mean=1e-9, max_kl=1e-7, min_cos=0.999999, max_rel_diff=1e-5,
        hidden_tol=1e-5, weight_tol=0.0, max_layer_err=1e-5, max_gain_dev=1e-5,
    ),
    "float": Thresholds(
        "float", min_top1=0.98, max_kl_mean=1e-4, max_kl=5e-2, min_cos=0.99, max_rel_diff=None,
        hidden_tol=1e-3, weight_tol=0.0, max_layer_err=2.3e-4, max_gain_dev=1e-5,
    ),
    "quantized": Thresholds(
        "quantized", min_top1=0.8, max_kl_mean=2e-3, max_kl=3e-3, min_cos=0.996, max_rel_diff=None,
        hidden_tol=0.5, weight_tol=0.1, max_layer_err=0.18, max_gain_dev=0.0073,
    ),
}  # fmt: skip

# The range each limit must lie in (a limit outside it is a typo, never a meaningful setting).
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "min_top1": (0.0, 1.0),
    "min_cos": (-1.0, 1.0),
    **{
        k: (0.0, math.inf)
        for k in (
            "max_kl_mean", "max_kl", "max_rel_diff", "hidden_tol", "weight_tol", "max_layer_err", "max_gain_dev",
        )
    },
}  # fmt: skip


def limit_problem(name: str, value: float | None) -> str | None:
    """Why ``value`` cannot be the limit ``name`` (a one-line message naming the option), or None when it can."""
    if value is None:
        return None
    lo, hi = LIMIT_RANGES[name]
    if isinstance(value, float) and math.isnan(value):
        return f"--{name.replace('_', '-')} must be a number, got nan"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        where = f"[{lo:g}, {hi:g}]" if hi < math.inf else f">= {lo:g}"
        return f"--{name.replace('_', '-')} must be {'in ' if hi < math.inf else ''}{where}, got {value!r}"
    return None


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


# ---------------------------------------------------------------------- teacher-forced layers


@dataclass
class LayerStats:
    """One layer run on the reference's inputs against the reference's outputs (see the module docstring)."""

    layer: int
    positions: int
    rel: float  # ||cand - ref|| / ||ref - input||, every position together
    rel_max: float  # worst position: ||cand_t - ref_t|| / RMS_t ||ref_t - input_t||
    gain: float  # sum <cand - input, ref - input> / sum ||ref - input||^2
    identical: bool
    prompt: int | None = None  # where rel_max is
    position: int | None = None

    def failures(self, th: Thresholds) -> list[str]:
        """The layer limits this fails, as short readable strings (NaN fails everything)."""
        out = []
        if not self.rel_max <= th.max_layer_err:
            out.append(f"worst position error {self.rel_max:.3e} > {th.max_layer_err:.0e} of the layer's update")
        if not abs(self.gain - 1) <= th.max_gain_dev:
            out.append(f"gain {self.gain:.5f}: |gain - 1| > {th.max_gain_dev:.0e}")
        return out


def layer_stats(
    layer: int, inputs: list[torch.Tensor], ref: list[torch.Tensor], cand: list[torch.Tensor]
) -> LayerStats:
    """Compare a layer's teacher-forced outputs ``cand`` with the reference's outputs ``ref`` for the same
    ``inputs`` (one [T_i, H] tensor per prompt), in float64."""
    err2, upd2, dot = [], [], 0.0
    for x, r, c in zip(inputs, ref, cand):
        x, r, c = x.double(), r.double(), c.double()
        u = r - x
        err2.append((c - r).pow(2).sum(-1))
        upd2.append(u.pow(2).sum(-1))
        dot += float(((c - x) * u).sum())
    e, u = torch.cat(err2), torch.cat(upd2)
    n = int(e.numel())
    if n == 0:
        return LayerStats(layer, 0, 0.0, 0.0, 1.0, True)
    total = float(u.sum())
    tiny = 1e-300
    rel = math.sqrt(float(e.sum()) / max(total, tiny))
    per = (e / max(total / n, tiny)).sqrt()
    if bool(torch.isnan(per).any()):
        rel_max, worst = float("nan"), int(torch.isnan(per).nonzero()[0])
    else:
        rel_max, worst = float(per.max()), int(per.argmax())
    starts = [0]
    for x in inputs:
        starts.append(starts[-1] + int(x.shape[0]))
    prompt = max(i for i in range(len(inputs)) if starts[i] <= worst)
    identical = all(torch.equal(r.float(), c.float()) for r, c in zip(ref, cand))
    return LayerStats(layer, n, rel, rel_max, dot / max(total, tiny), identical, prompt, worst - starts[prompt])
