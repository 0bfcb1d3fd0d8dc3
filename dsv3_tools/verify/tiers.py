"""Which limits fit a comparison (the tier), from what differs between the reference run and this one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
