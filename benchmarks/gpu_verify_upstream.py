"""The fault matrix's clean cases at real DeepSeek-V3 shapes on one GPU, with the upstream demo's arithmetic beside
ours, every layer teacher-forced on one reference, and the per-layer agreement recorded.

    python benchmarks/gpu_verify_upstream.py --upstream ../shared/upstream/deepseek-v3/inference \\
        --dir /tmp/dsv3-upstream [--layers 4] [--dense 1] [--experts 256] [--profile trained] [--build-only]

(Written for torch 2.11 + Triton 3.6 on an H100/H200. Within a per-command time limit, split it: ``--build-only``
first, then ``--demo`` (ours only), then ``--no-ours --demo fp8`` and ``--no-ours --demo bf16``, each with its own
``--json``; the checkpoint and the reference are reused.) Steps:

1. ``synth``: V3's geometry (hidden 7168, 128 heads, MLA 1536/512, dense 18432, experts 2048 wide, vocab 129280)
   cut to ``--layers`` layers (the first ``--dense`` dense, the rest MoE with ``--experts`` routed experts), FP8
   with f32 scales, no MTP, in the ``--profile`` style (``trained``: well-conditioned; ``random``: the harsh case).
2. The reference: ``verify --save-reference`` on the GPU (Triton, bf16 GEMM = weights dequantized exactly,
   float32): the logits and every layer's input for the five built-in prompts.
3. Ours, each against that reference through ``verify_checkpoint`` (so teacher-forced per layer): the same run
   again (``exact``), the torch engine (``float``: another dequantization kernel), ``--gemm fp8`` in float32 and in
   bfloat16, and bfloat16 compute.
4. The demo (``model.py`` and ``kernel.py`` imported from ``--upstream``, never copied): its ``Block`` per layer,
   built with our checkpoint's ``ModelArgs`` (``modelargs.demo_model_args``: ``max_seq_len`` 16384 > 4096, so its
   YaRN is on as ours always is), its weights read from the checkpoint by the name table (``names.mp_to_hf``), the
   router bias attached where the demo omits it (it creates one only when ``dim == 7168``); run on the reference's
   input of the layer (teacher forcing) one prompt at a time as the demo does, with its ``gemm_impl`` ``fp8``
   (activations quantized online) and ``bf16``, in bfloat16 (the demo's dtype); the same ``layer_stats`` as
   verify's. Also run free (layer after layer) for its last-position logits, compared with the reference's and with
   ours on ``--gemm fp8 --dtype bfloat16`` (the closest arithmetic of ours).

Prints one table (per case: each layer's worst-position error / error over all positions / gain, and the logits'
worst cosine); writes ``$OUT/gpu_verify_upstream.json`` when ``OUT`` is set. Everything but the kernels runs on the
CPU too (``--device cpu --kernels torch``: our torch references stand in for the demo's Triton kernels), which is
how ``tests/test_gpu_verify_upstream.py`` checks it on the tiny model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

from dsv3_tools import names as N
from dsv3_tools.checkpoint import Checkpoint, open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.modelargs import demo_model_args
from dsv3_tools.verify.metrics import TIERS, LayerStats, layer_stats
from dsv3_tools.verify.reference import Reference

# ---------------------------------------------------------------------- the demo, imported from its folder


def torch_kernels() -> types.ModuleType:
    """A stand-in for the demo's ``kernel`` module made of our plain-torch references (the CPU path): the same
    functions, signatures and output dtypes (the default dtype, as the demo's kernels return)."""
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm_ref
    from dsv3_tools.kernels.weight_dequant import weight_dequant_ref

    k = types.ModuleType("kernel")
    k.act_quant = lambda x, block_size=128, scale_fmt=None: act_quant_ref(x, block_size, scale_fmt)
    k.weight_dequant = lambda x, s, block_size=128: weight_dequant_ref(x, s, (block_size, block_size)).to(
        torch.get_default_dtype()
    )
    k.fp8_gemm = lambda a, a_s, b, b_s: fp8_gemm_ref(a, a_s, b, b_s, torch.get_default_dtype())
    return k


def load_upstream(folder: str | Path, kernels: str = "triton") -> types.ModuleType:
    """The demo's ``model`` module from ``folder`` (its ``kernel.py`` with ``kernels="triton"``, else ours)."""
    folder = Path(folder)
    if not (folder / "model.py").is_file():
        raise SystemExit(f"{folder}: no model.py (pass the demo's inference folder)")
    if kernels == "triton":
        spec = importlib.util.spec_from_file_location("kernel", folder / "kernel.py")
        kmod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kmod)
    else:
        kmod = torch_kernels()
    saved = sys.modules.get("kernel")
    sys.modules["kernel"] = kmod  # the demo's model.py does `from kernel import ...`
    try:
        spec = importlib.util.spec_from_file_location("dsv3_upstream_model", folder / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("kernel", None)
        else:
            sys.modules["kernel"] = saved
    return mod


def upstream_args(mod: types.ModuleType, cfg: ModelConfig) -> object:
    """The demo's ``ModelArgs`` for ``cfg`` (one sequence at a time; YaRN on, as in our model)."""
    d = demo_model_args(cfg) | {"max_batch_size": 1}
    return mod.ModelArgs(**d)


def _load_into(module: torch.nn.Module, prefix: str, ck: Checkpoint) -> None:
    """Every parameter of ``module`` (demo names under ``prefix``) from the checkpoint, by the name table."""
    for name, p in module.state_dict(keep_vars=True).items():
        t = ck.read(N.mp_to_hf(prefix + name))
        if tuple(t.shape) != tuple(p.shape):
            raise SystemExit(f"{prefix + name}: checkpoint {list(t.shape)} vs demo {list(p.shape)}")
        p.data.copy_(t.to(p.dtype))


def upstream_block(mod: types.ModuleType, args: object, ck: Checkpoint, layer: int, device: str) -> torch.nn.Module:
    """The demo's ``Block`` for ``layer`` with the checkpoint's weights (router bias attached when the checkpoint
    has one: the demo creates it only for ``dim == 7168``)."""
    cfg = ck.config
    mod.Linear.dtype = torch.float8_e4m3fn if cfg.is_fp8 else torch.bfloat16  # what Transformer() would set
    mod.Linear.scale_fmt = cfg.quant.scale_fmt if cfg.quant else None
    with torch.device(device):
        block = mod.Block(layer, args)
        bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        if cfg.is_moe_layer(layer) and block.ffn.gate.bias is None and bias in ck.tensors:
            block.ffn.gate.bias = torch.nn.Parameter(torch.empty(cfg.n_routed_experts, dtype=torch.float32))
    _load_into(block, f"layers.{layer}.", ck)
    return block.eval()


def run_upstream(
    mod: types.ModuleType, ck: Checkpoint, ref: Reference, *, gemm: str, device: str, dtype: torch.dtype
) -> dict:
    """The demo's blocks on the reference's inputs (teacher-forced, per layer), and run free layer after layer
    for its last-position logits; one prompt at a time (batch 1), as the demo runs."""
    cfg = ck.config
    args = upstream_args(mod, cfg)
    mod.gemm_impl = gemm
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            freqs = mod.precompute_freqs_cis(args)
            norm = mod.RMSNorm(cfg.hidden_size)
            head = mod.ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, dtype=dtype)  # as Transformer() makes it
        _load_into(norm, "norm.", ck)
        _load_into(head, "head.", ck)
        free = [p.hidden[0].to(device, dtype)[None] for p in ref.prompts]
        layers: dict[int, LayerStats] = {}
        with torch.inference_mode():
            for L in cfg.main_layers:
                block = upstream_block(mod, args, ck, L, device)

                def run(x: torch.Tensor, block: torch.nn.Module = block) -> torch.Tensor:
                    T = x.shape[1]
                    mask = torch.full((T, T), float("-inf"), device=device).triu_(1) if T > 1 else None
                    return block(x, 0, freqs[:T], mask)

                ins = [p.hidden[L] for p in ref.prompts]
                outs = [run(x.to(device, dtype)[None])[0].float().cpu() for x in ins]
                layers[L] = layer_stats(L, ins, [p.hidden[L + 1] for p in ref.prompts], outs)
                free = [run(h) for h in free]
                del block
            logits = [head(norm(h)[:, -1]).float().cpu()[0] for h in free]
    finally:
        torch.set_default_dtype(prev)
    return {"layers": layers, "last_logits": logits}


# ---------------------------------------------------------------------- comparing


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def last_rows(ref: Reference) -> list[torch.Tensor]:
    return [p.logits.full[-1] for p in ref.prompts]


def layers_record(stats: dict[int, LayerStats] | list) -> list[dict]:
    out = []
    for s in stats.values() if isinstance(stats, dict) else stats:
        out.append({"layer": s.layer, "rel_max": s.rel_max, "rel": s.rel, "gain": s.gain})
    return out


def ours(ckpt: Path, ref_path: Path, device: str, engine: str) -> dict:
    """Our clean kinds against the reference file (each teacher-forced per layer by verify itself)."""
    from dsv3_tools.verify import verify_checkpoint

    kinds = {
        "exact (same run)": {},
        "float (engine torch)": {"engine": "torch"},
        "ours --gemm fp8 (float32)": {"gemm": "fp8"},
        "ours --gemm fp8 --dtype bfloat16": {"gemm": "fp8", "dtype": "bfloat16"},
        "ours --dtype bfloat16": {"dtype": "bfloat16"},
    }
    out = {}
    for name, kw in kinds.items():
        opts = {"engine": engine} | kw
        if device == "cpu":
            opts["engine"] = "torch"
        t = time.perf_counter()
        r = verify_checkpoint(ckpt, reference=ref_path, device=device, stream=True, **opts)
        out[name] = {
            "tier": r.tier,
            "verdict": r.verdict,
            "failures": r.failures,
            "layers": [lr.stats for lr in r.layers if lr.stats is not None],
            "logits_cos_min": r.overall.cos_min,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"  {name}: {r.tier} {r.verdict} ({out[name]['seconds']} s)", flush=True)
    return out


def last_logits_of(ckpt: Path, ref: Reference, device: str, **kw: object) -> list[torch.Tensor]:
    """Our last-position logits for the reference's prompts (for the demo comparison)."""
    from dsv3_tools.model import run_model

    out = run_model(open_checkpoint(ckpt), ref.ids, device=device, stream=True, **kw)
    return [lg[-1] for lg in out.logits]


def table(rows: dict[str, dict]) -> str:
    lines = ["| case | tier | " + " | ".join(f"layer {L}" for L in rows[next(iter(rows))]["L"]) + " | logits cos min |"]
    lines.append("|---|---|" + "---|" * (len(rows[next(iter(rows))]["L"]) + 1))
    for name, r in rows.items():
        cells = [f"{s['rel_max']:.1e} / {s['rel']:.1e} / {s['gain']:.4f}" for s in r["layers"]]
        lines.append(f"| {name} | {r.get('tier', '')} | " + " | ".join(cells) + f" | {r['cos']:.6f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def build(path: Path, layers: int, dense: int, experts: int, profile: str, config: str = "deepseek-v3") -> None:
    from dsv3_tools.synth import synth

    if (path / "config.json").is_file():
        return
    cfg = ModelConfig.load(config)
    cfg = replace(cfg, num_hidden_layers=layers, first_k_dense_replace=dense, num_nextn_predict_layers=0)
    t = time.perf_counter()
    synth(path, cfg, dtype="fp8", seed=0, shards=8, experts=experts, profile=profile)
    print(f"synth ({profile}, {layers} layers, {experts} experts): {time.perf_counter() - t:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", type=Path, default=os.environ.get("DSV3_UPSTREAM_DIR"), required=False)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3-upstream"))
    ap.add_argument("--config", default="deepseek-v3", help="the geometry (tiny: the CPU check of this script)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense", type=int, default=1)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--profile", default="trained", choices=["trained", "random"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", default="triton", choices=["triton", "torch"], help="the demo's kernels, or ours")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True, help="our clean kinds")
    ap.add_argument("--demo", nargs="*", default=["fp8", "bf16"], choices=["fp8", "bf16"], help="the demo's gemm_impl")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.upstream is None:
        raise SystemExit("--upstream (or DSV3_UPSTREAM_DIR): the demo's inference folder")
    ck_path, ref_path = args.dir / "ckpt", args.dir / "ref.safetensors"
    build(ck_path, args.layers, args.dense, args.experts, args.profile, args.config)
    if args.build_only:
        return 0
    from dsv3_tools.verify import verify_checkpoint
    from dsv3_tools.verify.reference import load_reference

    engine = "triton" if args.device.startswith("cuda") else "torch"
    if not ref_path.is_file():
        t = time.perf_counter()
        r = verify_checkpoint(ck_path, save_reference=ref_path, device=args.device, engine=engine, stream=True)
        assert r.verdict == "pass", r.failures
        print(f"reference: {time.perf_counter() - t:.0f} s, {ref_path.stat().st_size / 1e6:.0f} MB", flush=True)
    ref = load_reference(ref_path)
    ck = open_checkpoint(ck_path)
    L = list(ck.config.main_layers)
    rows: dict[str, dict] = {}
    for name, r in (ours(ck_path, ref_path, args.device, engine) if args.ours else {}).items():
        rows[name] = {"tier": r["tier"], "L": L, "layers": layers_record(r["layers"]), "cos": r["logits_cos_min"]}
    mod = load_upstream(args.upstream, args.kernels) if args.demo else None
    want = last_rows(ref)
    ours_fp8 = None
    if "fp8" in args.demo:
        ours_fp8 = last_logits_of(ck_path, ref, args.device, engine=engine, gemm="fp8", dtype=torch.bfloat16)
    for gemm in args.demo:
        t = time.perf_counter()
        up = run_upstream(mod, ck, ref, gemm=gemm, device=args.device, dtype=torch.bfloat16)
        name = f"demo gemm_impl {gemm} (bfloat16)"
        rows[name] = {"L": L, "layers": layers_record(up["layers"]), "cos": cos(torch.stack(up["last_logits"]),
                      torch.stack(want))}  # fmt: skip
        if gemm == "fp8":
            rows[name]["cos vs ours --gemm fp8 --dtype bfloat16"] = cos(
                torch.stack(up["last_logits"]), torch.stack(ours_fp8)
            )
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
    md = table(rows) if rows else "(nothing run)"
    print(md)
    print("(each layer: worst-position error / error over all positions, relative to the layer's update / gain; "
          "logits: every position for ours, the last position for the demo)")  # fmt: skip
    doc = {
        "machine": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "limits": {t: {k: getattr(TIERS[t], k) for k in ("max_layer_err", "max_gain_dev")} for t in TIERS},
    }
    out = args.json or (Path(os.environ["OUT"]) / "gpu_verify_upstream.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
