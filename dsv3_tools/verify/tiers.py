"""Which limits fit a comparison (the tier), from what differs between the reference run and this one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Re-quantizing a weight to block FP8 (e4m3: 3 mantissa bits, scales f32 or a power of two) moves each value by at
# most half a step, 1/16 of it: a 128-column block of a probed row moves by less than that relative to its norm.
# Unrelated weights of the same distribution differ by ~sqrt(2). A block beyond this is not a re-quantization.
REQUANT_REL = 0.0625
UNRELATED_REL = 0.25


@dataclass
class ProbeDiff:
    """How many probed 128-column weight blocks differ between two runs, over how many, in which layers, by how
    much (relative Frobenius error of each differing block)."""

    differing: int
    compared: int
    layers: list[int]  # layers with at least one differing block
    layers_compared: int
    rows: int = 0  # probed rows (one per 128-row block of each layer's kv_a_proj_with_mqa)
    rel: list[float] = field(default_factory=list)  # per differing block

    @property
    def requantized(self) -> bool:
        """Re-quantization changes blocks in every layer; a local edit (a bad file, a wrong tensor) in a few."""
        return (
            self.compared > 0
            and self.differing >= 0.25 * self.compared
            and len(self.layers) >= 0.9 * self.layers_compared
        )

    @property
    def median_rel(self) -> float:
        return float(torch.tensor(self.rel).median()) if self.rel else 0.0

    @property
    def unrelated(self) -> bool:
        """Nearly every probed block differs, typically far beyond re-quantization error: other weights."""
        return self.compared > 0 and self.differing >= 0.9 * self.compared and self.median_rel > UNRELATED_REL

    def coverage(self) -> str:
        """What the probe compares, for the report (it covers one tensor per layer, not the whole checkpoint)."""
        return (
            f"probe: {self.rows} row(s) of kv_a_proj_with_mqa (one per 128-row block) in each of "
            f"{self.layers_compared} layer(s), {self.compared} 128-column blocks; other tensors are judged by "
            "their layers' outputs"
        )


def probe_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> ProbeDiff:
    """Compare two weight probes (``weight_probe``) block by block."""
    diff = total = rows = 0
    layers, rel = [], []
    common = [L for L in sorted(set(a) & set(b)) if a[L].shape == b[L].shape]
    for L in common:
        x, y = a[L].double(), b[L].double()
        H = x.shape[1]
        nb = -(-H // 128)
        pad = (0, nb * 128 - H)
        xb = torch.nn.functional.pad(x, pad).reshape(x.shape[0], nb, 128)
        yb = torch.nn.functional.pad(y, pad).reshape(y.shape[0], nb, 128)
        dx = (xb != yb).any(-1)
        e = (xb - yb).norm(dim=-1) / yb.norm(dim=-1).clamp_min(1e-30)
        n = int(dx.sum())
        diff += n
        total += dx.numel()
        rows += x.shape[0]
        rel += e[dx].tolist()
        if n:
            layers.append(L)
    return ProbeDiff(diff, total, layers, len(common), rows // max(len(common), 1), rel)


def choose_tier(ref_meta: dict, cand_meta: dict, probe: ProbeDiff | None) -> tuple[str, list[str]]:
    """Which thresholds fit this comparison, and why (see ``metrics.TIERS``)."""
    reasons = []
    rw, cw = ref_meta["checkpoint"], cand_meta["checkpoint"]
    requant = False
    if probe is not None and probe.compared > 0:
        d, n = probe.differing, probe.compared
        if probe.unrelated:
            requant = True  # the loosest limits: the metrics, not the tier, then say how far apart they are
            reasons.append(
                f"different weights: {d} of {n} probed weight blocks differ, by {probe.median_rel:.2f} (median "
                f"relative error), far beyond re-quantization (< {REQUANT_REL}): not the reference's model"
            )
        elif probe.requantized:
            requant = True
            reasons.append(f"weights re-quantized: {d} of {n} probed weight blocks differ, in every layer")
        elif d:
            reasons.append(
                f"{d} of {n} probed weight blocks differ, in layers {probe.layers} only: a local change, "
                "not re-quantization"
            )
        else:
            reasons.append("probed weight blocks identical")
        reasons.append(probe.coverage())
    elif (rw["weights"], rw["scale_fmt"]) != (cw["weights"], cw["scale_fmt"]) and cw["weights"] == "fp8":
        requant = True
        reasons.append(f"weights re-quantized: {rw['weights']}/{rw['scale_fmt']} -> {cw['weights']}/{cw['scale_fmt']}")
    rr, cr = ref_meta["run"], cand_meta["run"]
    # The FP8 GEMM path on both sides, with the same activation scale format, is the same arithmetic.
    fp8_gemm = rr["gemm"] != cr["gemm"] or (rr["gemm"] == "fp8" and rw["scale_fmt"] != cw["scale_fmt"])
    if fp8_gemm:
        reasons.append(f"FP8 GEMM path on one side (activations quantized online): gemm {rr['gemm']} vs {cr['gemm']}")
    low = "bfloat16" in (rr.get("dtype"), cr.get("dtype")) and rr.get("dtype") != cr.get("dtype")
    if low:
        reasons.append(f"compute dtype {rr.get('dtype')} vs {cr.get('dtype')}: bfloat16 rounding of every activation")
    if requant or fp8_gemm or low:
        return "quantized", reasons
    diffs = [k for k in ("device", "engine", "dtype", "world") if rr.get(k) != cr.get(k)]
    if diffs:
        reasons.append("different arithmetic: " + ", ".join(f"{k} {rr.get(k)} vs {cr.get(k)}" for k in diffs))
        return "float", reasons
    reasons.append(
        f"same arithmetic (device, engine, gemm {cr['gemm']}, dtype, one process): expect bit-identical logits"
    )
    return "exact", reasons
