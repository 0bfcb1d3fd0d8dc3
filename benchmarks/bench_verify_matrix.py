"""The verify fault matrix: planted faults x comparison kinds, on the tiny model in both synth profiles, and the
limits derived from it (docs/verify.md records a run).

    python benchmarks/bench_verify_matrix.py --workdir /work/bench-tmp/matrix [--profiles trained random]
        [--json matrix.json] [--markdown matrix.md] [--record docs/verify-matrix.json]

For each profile: the tiny FP8 checkpoint (seed 0, f32 scales) and its reference file (CPU, float32, bf16 GEMM,
MTP kept, the five built-in prompts: 416 tokens), with every layer's input (teacher forcing).

Comparison kinds (``KINDS``): the candidate checkpoint and how it runs against that reference:
  exact          the FP8 checkpoint itself, same arithmetic
  float          the same, computed in float64
  requant-f32    ``cast fp8-bf16`` then ``cast bf16-fp8`` with f32 scales (re-quantized weights)
  requant-ue8m0  the same with power-of-two (ue8m0) scales
  gemm-fp8       the FP8 checkpoint on the FP8 GEMM path (activations quantized online)
  bf16           the FP8 checkpoint computed in bfloat16
  ue8m0+gemm-fp8 the ue8m0 re-quantization on the FP8 GEMM path (a V3.1-style checkpoint served as it is)

Faults (``FAULTS``), each planted in a copy of the kind's checkpoint by rewriting tensor bytes, located by this
script's own reading of the safetensors headers (not the project's reader): one 128x128 scale block x2, 16 rows of
one expert's down_proj negated, two experts swapped, a layer's attention output zeroed (o_proj = 0), a
post-attention norm scaled by 1.01, two layers swapped, a layer's scales rounded up to powers of two (ue8m0 scales
where f32 were meant; not applicable where the scales already are powers of two).

Each case runs ``verify_checkpoint`` against the reference. A fault is *detected* when the verdict is fail, and
*localized* when the first failing teacher-forced layer is the fault's layer; a clean case is a *false alarm* when
it fails. ``derive`` turns the clean cases of the trained profile into limits (see docs/verify.md), and the
summary shows, per tier and metric, the worst clean value, the limit, and each fault's value at its layer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# ---------------------------------------------------------------------- byte surgery (independent of dsv3_tools)

_DT = {"F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "BF16": torch.bfloat16}


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _file_of(folder: Path, name: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def names(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    return [k for k in _header(folder / "model.safetensors")[1] if k != "__metadata__"]


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    f = _file_of(folder, name)
    start, hdr = _header(f)
    e = hdr[name]
    b, en = e["data_offsets"]
    with open(f, "rb") as fh:
        fh.seek(start + b)
        raw = bytearray(fh.read(en - b))
    return torch.frombuffer(raw, dtype=torch.uint8).view(_DT[e["dtype"]]).reshape(e["shape"]).clone()


def write_tensor(folder: Path, name: str, t: torch.Tensor) -> None:
    """Overwrite tensor ``name`` in place (same dtype and shape)."""
    f = _file_of(folder, name)
    start, hdr = _header(f)
    e = hdr[name]
    assert list(t.shape) == e["shape"] and t.dtype == _DT[e["dtype"]], (name, t.shape, t.dtype)
    with open(f, "r+b") as fh:
        fh.seek(start + e["data_offsets"][0])
        fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def swap_tensors(folder: Path, a: str, b: str) -> None:
    ta, tb = read_tensor(folder, a), read_tensor(folder, b)
    write_tensor(folder, a, tb)
    write_tensor(folder, b, ta)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s.double()))).float()


# ---------------------------------------------------------------------- the faults (tiny: layer 0 dense, 1-2 MoE)


@dataclass(frozen=True)
class Fault:
    name: str
    layer: int  # the (first) layer it is in
    plant: Callable[[Path], bool]  # False: not applicable to this checkpoint (the change would be no change)
    what: str


def _scale_block(folder: Path) -> bool:
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    s = read_tensor(folder, name)
    s[1, 2] *= 2
    write_tensor(folder, name, s)
    return True


def _expert_rows(folder: Path) -> bool:
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    w = read_tensor(folder, name)
    u = w.view(torch.uint8)
    u[:16] ^= 0x80  # the FP8 sign bit: 16 output rows negated
    write_tensor(folder, name, u.view(w.dtype))
    return True


def _experts_swapped(folder: Path) -> bool:
    for m in ("gate_proj", "up_proj", "down_proj"):
        for leaf in ("weight", "weight_scale_inv"):
            swap_tensors(folder, f"model.layers.2.mlp.experts.1.{m}.{leaf}", f"model.layers.2.mlp.experts.6.{m}.{leaf}")
    return True


def _attn_zeroed(folder: Path) -> bool:
    name = "model.layers.1.self_attn.o_proj.weight"
    write_tensor(folder, name, torch.zeros_like(read_tensor(folder, name)))
    return True


def _norm_scaled(folder: Path) -> bool:
    name = "model.layers.1.post_attention_layernorm.weight"
    write_tensor(folder, name, (read_tensor(folder, name).float() * 1.01).to(torch.bfloat16))
    return True


def _layers_swapped(folder: Path) -> bool:
    for n in names(folder):
        if n.startswith("model.layers.1."):
            swap_tensors(folder, n, "model.layers.2." + n.removeprefix("model.layers.1."))
    return True


def _ue8m0_scales(folder: Path) -> bool:
    changed = False
    for n in names(folder):
        if n.startswith("model.layers.2.") and n.endswith("_scale_inv"):
            s = read_tensor(folder, n)
            p = _pow2_ceil(s)
            changed |= not torch.equal(p, s)
            write_tensor(folder, n, p)
    return changed


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("scale block x2", 0, _scale_block, "layer 0 mlp.down_proj: scale block [1, 2] doubled"),
        Fault("expert rows negated", 2, _expert_rows, "layer 2 expert 5 down_proj: rows 0-15 negated"),
        Fault("experts swapped", 2, _experts_swapped, "layer 2 experts 1 and 6 swapped (weights and scales)"),
        Fault("attention zeroed", 1, _attn_zeroed, "layer 1 self_attn.o_proj all zero"),
        Fault("norm x1.01", 1, _norm_scaled, "layer 1 post_attention_layernorm x 1.01 (BF16)"),
        Fault("layers swapped", 1, _layers_swapped, "layers 1 and 2 swapped (every tensor)"),
        Fault("ue8m0 scales", 2, _ue8m0_scales, "layer 2: every scale rounded up to a power of two"),
    )
}

# kind -> (candidate checkpoint key, verify options)
KINDS: dict[str, tuple[str, dict]] = {
    "exact": ("fp8", {}),
    "float": ("fp8", {"dtype": "float64"}),
    "requant-f32": ("requant-f32", {}),
    "requant-ue8m0": ("requant-ue8m0", {}),
    "gemm-fp8": ("fp8", {"gemm": "fp8"}),
    "bf16": ("fp8", {"dtype": "bfloat16"}),
    "ue8m0+gemm-fp8": ("requant-ue8m0", {"gemm": "fp8"}),
}
TIER_OF_KIND = {"exact": "exact", "float": "float"}  # the rest: quantized


# ---------------------------------------------------------------------- running one case


def build(workdir: Path, profile: str) -> dict[str, Path]:
    """The profile's checkpoints (the FP8 original and its re-quantizations) and the reference file."""
    from dsv3_tools.cast import cast_bf16_to_fp8, cast_fp8_to_bf16
    from dsv3_tools.synth import synth
    from dsv3_tools.verify import verify_checkpoint

    d = workdir / profile
    out = {k: d / k for k in ("fp8", "bf16", "requant-f32", "requant-ue8m0")}
    out["ref"] = d / "ref.safetensors"
    if out["ref"].is_file():
        return out
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    synth(out["fp8"], "tiny", dtype="fp8", seed=0, shards=4, profile=profile)
    cast_fp8_to_bf16(out["fp8"], out["bf16"], device="cpu")
    cast_bf16_to_fp8(out["bf16"], out["requant-f32"], scale_fmt="f32")
    cast_bf16_to_fp8(out["bf16"], out["requant-ue8m0"], scale_fmt="ue8m0")
    r = verify_checkpoint(out["fp8"], save_reference=out["ref"], mtp=True)
    assert r.verdict == "pass", r.failures
    return out


def case_record(r) -> dict:  # noqa: ANN001 (a VerifyReport)
    """What the matrix keeps of one verify report."""
    layers = []
    for lr in r.layers:
        if lr.stats is not None:
            s = lr.stats
            layers.append({"layer": lr.layer, "rel": s.rel, "rel_max": s.rel_max, "gain_dev": abs(s.gain - 1)})
        else:
            g = lr.logits
            layers.append({"layer": lr.layer, "mtp": True, "kl_mean": g.kl_mean, "kl_max": g.kl_max,
                           "cos_min": g.cos_min, "top1": g.top1})  # fmt: skip
    o, m = r.overall, r.mtp_overall

    def logit(s) -> dict:  # noqa: ANN001
        return {"top1": s.top1, "kl_mean": s.kl_mean, "kl_max": s.kl_max, "cos_min": s.cos_min}

    return {
        "tier": r.tier,
        "verdict": r.verdict,
        "failing_layers": [lr.layer for lr in r.layers if lr.failures],
        "first": r.divergence.layer if r.divergence is not None else None,
        "failures": r.failures,
        "logits": logit(o),
        "mtp_logits": logit(m) if m is not None else None,
        "layers": layers,
    }


def run_case(paths: dict[str, Path], kind: str, fault: Fault | None, scratch: Path) -> dict | None:
    from dsv3_tools.verify import verify_checkpoint

    key, opts = KINDS[kind]
    ck = paths[key]
    if fault is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(ck, scratch)
        if not fault.plant(scratch):
            shutil.rmtree(scratch)
            return None
        ck = scratch
    r = verify_checkpoint(ck, reference=paths["ref"], mtp=True, **opts)
    rec = case_record(r)
    if fault is not None:
        shutil.rmtree(scratch)
    return rec


def run_matrix(workdir: Path, profiles: list[str], kinds: list[str], faults: list[str], log=print) -> dict:  # noqa: ANN001
    results: dict = {}
    for profile in profiles:
        paths = build(workdir, profile)
        for kind in kinds:
            for fname in [None, *faults]:
                t = time.perf_counter()
                rec = run_case(paths, kind, FAULTS[fname] if fname else None, workdir / "scratch")
                label = fname or "clean"
                results.setdefault(profile, {}).setdefault(kind, {})[label] = rec
                if rec is None:
                    log(f"{profile:8s} {kind:14s} {label:20s} n/a")
                else:
                    log(f"{profile:8s} {kind:14s} {label:20s} {rec['tier']:9s} {rec['verdict']:4s} "
                        f"layers {rec['failing_layers']} ({time.perf_counter() - t:.1f} s)")  # fmt: skip
    return results


# ---------------------------------------------------------------------- judging and deriving

LAYER_METRICS = ("rel_max", "rel", "gain_dev")  # worst position / every position / |gain - 1|
JUDGED = {"rel_max": "max_layer_err", "gain_dev": "max_gain_dev"}  # the layer metrics with limits (Thresholds)
SAFETY = 4.0  # end-to-end logits: limit = SAFETY x the worst clean deviation (see docs/verify.md)
PROFILES_OF_TIER = {"float": ("trained", "random"), "quantized": ("trained",)}


def round_sig(x: float, digits: int = 2, up: bool = False) -> float:
    """``x`` to ``digits`` significant digits (rounded up with ``up``)."""
    if x <= 0 or not math.isfinite(x):
        return x
    q = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{(math.ceil(x / q - 1e-9) if up else round(x / q)) * q:.{digits}g}")


def tier_of(kind: str) -> str:
    return TIER_OF_KIND.get(kind, "quantized")


def clean_worst(results: dict, profile: str, tier: str) -> dict[str, float]:
    """The worst value of each teacher-forced layer metric and end-to-end logit metric over the clean cases."""
    worst: dict[str, float] = {}
    for kind, cases in results[profile].items():
        if tier_of(kind) != tier or cases.get("clean") is None:
            continue
        c = cases["clean"]
        for lr in c["layers"]:
            if lr.get("mtp"):
                worst["mtp_forced_kl_mean"] = max(worst.get("mtp_forced_kl_mean", 0.0), lr["kl_mean"])
                worst["mtp_forced_kl_max"] = max(worst.get("mtp_forced_kl_max", 0.0), lr["kl_max"])
                worst["mtp_forced_cos_dev"] = max(worst.get("mtp_forced_cos_dev", 0.0), 1 - lr["cos_min"])
                continue
            for m in LAYER_METRICS:
                worst[m] = max(worst.get(m, 0.0), lr[m])
        for side, s in (("", c["logits"]), ("mtp_", c["mtp_logits"])):
            if s is None:
                continue
            worst[side + "kl_mean"] = max(worst.get(side + "kl_mean", 0.0), s["kl_mean"])
            worst[side + "kl_max"] = max(worst.get(side + "kl_max", 0.0), s["kl_max"])
            worst[side + "cos_dev"] = max(worst.get(side + "cos_dev", 0.0), 1 - s["cos_min"])
            worst[side + "top1_dev"] = max(worst.get(side + "top1_dev", 0.0), 1 - s["top1"])
    return worst


def derive(results: dict) -> dict:
    """The float and quantized tiers' limits from the matrix (the rule in docs/verify.md), with their margins.

    Layer limits: each planted fault (in each kind of the tier, trained profile) is assigned to the judged metric
    in which it stands out most against that metric's worst clean value (over the tier's kinds, in the profiles of
    ``PROFILES_OF_TIER``); a metric's limit is the geometric midpoint between its worst clean value and the
    weakest fault assigned to it, so both margins are equal (a metric assigned none: the weakest fault's value in
    that metric, so that it still judges on its own). End-to-end logit limits (quantized tier): SAFETY x the
    worst clean deviation of the main logits, of the MTP logits through ``Thresholds.for_mtp`` (agreement halved,
    KL doubled) and of the teacher-forced MTP module, whichever asks more."""
    out: dict = {}
    for tier, profiles in PROFILES_OF_TIER.items():
        ws = [clean_worst(results, p, tier) for p in profiles if p in results]
        if not ws or "trained" not in results or not any(m in w for w in ws for m in JUDGED):
            continue
        clean = {m: max(w.get(m, 0.0) for w in ws) for m in JUDGED}
        weakest: dict[str, tuple[float, str]] = {m: (math.inf, "") for m in JUDGED}
        for kind in results["trained"]:
            if tier_of(kind) != tier:
                continue
            for fault in FAULTS:
                v = fault_values(results, "trained", kind, fault)
                if v is None:
                    continue
                m = max(JUDGED, key=lambda k: v[k] / max(clean[k], 1e-300))
                if v[m] < weakest[m][0]:
                    weakest[m] = (v[m], f"{fault} ({kind})")
        for m in JUDGED:  # a metric that catches no fault: the midpoint to the weakest fault in that metric
            if not math.isfinite(weakest[m][0]):
                for kind in results["trained"]:
                    for fault in FAULTS if tier_of(kind) == tier else ():
                        v = fault_values(results, "trained", kind, fault)
                        if v is not None and v[m] < weakest[m][0]:
                            weakest[m] = (v[m], f"{fault} ({kind}), caught by another metric")
        lim: dict = {}
        for m, field in JUDGED.items():
            w, by = weakest[m]
            limit = round_sig(math.sqrt(clean[m] * w))
            lim[field] = limit
            lim[field + "_margins"] = {"clean": clean[m], "limit / clean": limit / max(clean[m], 1e-300),
                                       "weakest fault": w, "by": by, "weakest / limit": w / limit}  # fmt: skip
        if tier == "quantized":
            w = ws[0]
            kl_mean = max(w["kl_mean"], w.get("mtp_kl_mean", 0) / 2, w.get("mtp_forced_kl_mean", 0))
            kl_max = max(w["kl_max"], w.get("mtp_kl_max", 0) / 2, w.get("mtp_forced_kl_max", 0))
            cos_dev = max(w["cos_dev"], w.get("mtp_cos_dev", 0) / 2, w.get("mtp_forced_cos_dev", 0))
            top1_dev = max(w["top1_dev"], w.get("mtp_top1_dev", 0) / 2)
            lim["max_kl_mean"] = round_sig(SAFETY * kl_mean, 1, up=True)
            lim["max_kl"] = round_sig(SAFETY * kl_max, 1, up=True)
            lim["min_cos"] = round(1 - round_sig(SAFETY * cos_dev, 1, up=True), 10)
            lim["min_top1"] = round(1 - round_sig(SAFETY * top1_dev, 1, up=True), 10)
        out[tier] = lim
    return out


def fault_values(results: dict, profile: str, kind: str, fault: str) -> dict[str, float] | None:
    """A fault's teacher-forced metrics at its own layer."""
    rec = results[profile][kind].get(fault)
    if rec is None:
        return None
    lr = next((x for x in rec["layers"] if x["layer"] == FAULTS[fault].layer), None)
    return {m: lr[m] for m in LAYER_METRICS} if lr is not None else None


def summary(results: dict) -> dict:
    """Detection / localization / false-alarm counts per profile and kind (under the limits in effect)."""
    out: dict = {}
    for profile, kinds in results.items():
        for kind, cases in kinds.items():
            row = {"detected": 0, "localized": 0, "planted": 0, "false_alarm": 0, "missed": [], "mislocalized": []}
            for label, rec in cases.items():
                if rec is None:
                    continue
                if label == "clean":
                    row["false_alarm"] += rec["verdict"] == "fail"
                    row["clean_failures"] = rec["failures"]
                    continue
                row["planted"] += 1
                row["detected"] += rec["verdict"] == "fail"
                ok = rec["first"] == FAULTS[label].layer
                row["localized"] += ok
                if rec["verdict"] != "fail":
                    row["missed"].append(label)
                elif not ok:
                    row["mislocalized"].append(f"{label} -> {rec['first']}")
            out.setdefault(profile, {})[kind] = row
    return out


def markdown(results: dict) -> str:
    """The tables docs/verify.md shows."""
    lines = []
    s = summary(results)
    lines.append("| profile | kind | tier | faults detected | localized to their layer | clean false alarm |")
    lines.append("|---|---|---|---|---|---|")
    for profile, kinds in s.items():
        for kind, row in kinds.items():
            tier = results[profile][kind]["clean"]["tier"]
            miss = f" (missed: {', '.join(row['missed'])})" if row["missed"] else ""
            mis = f" ({', '.join(row['mislocalized'])})" if row["mislocalized"] else ""
            fa = "no"
            if row["false_alarm"]:
                c = results[profile][kind]["clean"]
                what = [
                    w
                    for w, bad in (
                        (
                            "logits",
                            any(not f.startswith(("MTP", f"{len(c['failing_layers'])} layer")) for f in c["failures"]),
                        ),
                        ("MTP logits", any(f.startswith("MTP") for f in c["failures"])),
                    )
                    if bad
                ]
                what += [f"layer(s) {', '.join(map(str, c['failing_layers']))}"] if c["failing_layers"] else []
                fa = "yes: " + ", ".join(what)  # fmt: skip
            lines.append(
                f"| {profile} | {kind} | {tier} | {row['detected']}/{row['planted']}{miss} | "
                f"{row['localized']}/{row['planted']}{mis} | {fa} |"
            )
    for profile in results:
        lines.append("")
        lines.append(f"Teacher-forced layer metrics, {profile} profile: worst clean layer | each fault at its layer "
                     "(worst-position error / error over all positions / |gain - 1|)")  # fmt: skip
        lines.append("")
        faults = list(FAULTS)
        lines.append("| kind | clean (worst layer) | " + " | ".join(faults) + " |")
        lines.append("|---|---|" + "---|" * len(faults))
        for kind, cases in results[profile].items():
            c = cases["clean"]
            main = [x for x in c["layers"] if not x.get("mtp")]
            cw = "/".join(f"{max(x[m] for x in main):.1e}" for m in LAYER_METRICS)
            cells = []
            for f in faults:
                v = fault_values(results, profile, kind, f)
                cells.append("n/a" if v is None else "/".join(f"{v[m]:.1e}" for m in LAYER_METRICS))
            lines.append(f"| {kind} | {cw} | " + " | ".join(cells) + " |")
    d = derive(results)
    if d:
        lines += [
            "",
            "Derived limits (rule: derive's docstring; margins: limit / worst clean, weakest fault / limit)",
            "",
        ]
        lines.append("| tier | limit | worst clean | limit | weakest fault it catches | margins |")
        lines.append("|---|---|---|---|---|---|")
        for tier, lim in d.items():
            for field in JUDGED.values():
                m = lim[field + "_margins"]
                lines.append(f"| {tier} | {field} | {m['clean']:.2g} | {lim[field]:g} | {m['weakest fault']:.2g}: "
                             f"{m['by']} | {m['limit / clean']:.1f}x / {m['weakest / limit']:.1f}x |")  # fmt: skip
            for field in ("max_kl_mean", "max_kl", "min_cos", "min_top1"):
                if field in lim:
                    lines.append(f"| {tier} | {field} | | {lim[field]:g} | | (SAFETY {SAFETY:g}x the worst clean) |")
    return "\n".join(lines)


def record(doc: dict, argv: list[str]) -> dict:
    """What docs/verify-matrix.json keeps of a run (enough for ``derive``, ``summary`` and ``markdown``): values
    to 6 significant digits, without the failure messages."""

    def r(x: object) -> object:
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: r(v) for k, v in x.items() if k != "failures"}
        if isinstance(x, list):
            return [r(v) for v in x]
        return x

    cmd = "python benchmarks/bench_verify_matrix.py " + " ".join(argv[1:])
    return {"command": cmd, "machine": doc["machine"], "seconds": doc["seconds"]} | {
        k: r(doc[k]) for k in ("results", "summary")
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/verify-matrix"))
    ap.add_argument("--profiles", nargs="+", default=["trained", "random"])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--faults", nargs="+", default=list(FAULTS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--record", type=Path, default=None, help="the compact record (docs/verify-matrix.json)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    results = run_matrix(args.workdir, args.profiles, args.kinds, args.faults)
    doc = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
        "summary": summary(results),
        "worst_clean": {p: {t: clean_worst(results, p, t) for t in ("exact", "float", "quantized")} for p in results},
        "derived": derive(results),
    }
    md = markdown(results)
    print(md)
    print("derived limits:", json.dumps(doc["derived"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.record:
        args.record.write_text(json.dumps(record(doc, sys.argv), separators=(",", ":"), sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
