"""How well-conditioned each synth profile is: BF16-GEMM vs FP8-GEMM, on the tiny model and at real DeepSeek-V3
tensor shapes, on the CPU (docs/verify.md records a run).

    python benchmarks/bench_verify_conditioning.py --workdir /work/bench-tmp/cond [--shapes tiny v3]
        [--profiles trained random] [--layers 4] [--experts 32] [--json out.json]

For each geometry and profile: a synthetic FP8 checkpoint (seed 0, f32 scales, no MTP); the five built-in prompts
run with the weights dequantized exactly (``gemm="bf16"``, float32), keeping every layer's input; then on the FP8
GEMM path (``gemm="fp8"``: activations quantized online), free-running and, through the model's teacher hook, each
layer also on the first run's input of it. Reported per layer: the worst cosine over positions of the free-running
hidden states, and the teacher-forced layer's worst-position error relative to its update and its gain (verify's
``layer_stats``); per MoE layer, how many tokens the FP8 run sends to other experts and the smallest top-k score
margin; for the logits, the worst cosine over positions and the top-1 agreement.

``v3``: V3's tensors at their real shapes (hidden 7168, 128 heads, MLA 1536/512, dense 18432, experts 2048 wide,
vocab 129280), cut to ``--layers`` layers (the first dense) and ``--experts`` routed experts (8 groups, top 4 groups,
8 experts per token as in V3): what fits the CPU machine's memory (one streamed MoE layer in float32).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.model import run_model
from dsv3_tools.synth import synth
from dsv3_tools.verify.metrics import layer_stats
from dsv3_tools.verify.prompts import DEFAULT_PROMPTS, tokenize


def geometry(shape: str, layers: int) -> ModelConfig:
    if shape == "tiny":
        return ModelConfig.load("tiny")
    cfg = ModelConfig.load("deepseek-v3")
    return replace(cfg, num_hidden_layers=layers, first_k_dense_replace=1, num_nextn_predict_layers=0)


def cos_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def spy_routes(record: dict) -> Callable[[], None]:
    """Record each MoE layer's chosen experts and its top-k score margin (the k-th minus the (k+1)-th biased score)
    in ``record[layer]``; returns the function that stops recording."""
    from dsv3_tools import model as M

    route = M.Layer.route

    def spy(self, x):  # noqa: ANN001
        idx, w = route(self, x)
        s = torch.nn.functional.linear(x.float(), self.gate).sigmoid() + (0 if self.bias is None else self.bias)
        top = s.sort(-1, descending=True).values
        k = self.env.cfg.num_experts_per_tok
        record.setdefault(self.L, []).append((idx.sort(-1).values.cpu(), (top[:, k - 1] - top[:, k]).cpu()))
        return idx, w

    M.Layer.route = spy

    def stop() -> None:
        M.Layer.route = route

    return stop


def measure(path: Path) -> dict:
    ck = open_checkpoint(path)
    ids = tokenize(path, list(DEFAULT_PROMPTS))
    embed = ck.read("model.embed_tokens.weight")
    inputs: dict[int, list[torch.Tensor]] = {0: [embed[torch.tensor(r)].float() for r in ids]}
    routes: dict[int, list] = {}
    stop = spy_routes(routes)
    t = time.perf_counter()
    try:
        a = run_model(ck, ids, gemm="bf16", on_layer=lambda L, h: inputs.__setitem__(L + 1, h))
    finally:
        stop()
    t_bf16 = time.perf_counter() - t
    free8: dict[int, list[torch.Tensor]] = {}
    forced: dict[int, dict] = {}

    def teacher(L: int, run) -> None:  # noqa: ANN001
        s = layer_stats(L, inputs[L], inputs[L + 1], run(inputs[L]))
        forced[L] = {"rel_max": s.rel_max, "rel": s.rel, "gain": s.gain}

    routes8: dict[int, list] = {}
    stop = spy_routes(routes8)
    t = time.perf_counter()
    try:
        b = run_model(ck, ids, gemm="fp8", on_layer=lambda L, h: free8.__setitem__(L, h), teacher=teacher)
    finally:
        stop()
    t_fp8 = time.perf_counter() - t
    # The free runs' first route call per layer (the teacher-forced call comes second on the FP8 path).
    routing = {
        L: {
            "tokens_with_other_experts": int((routes[L][0][0] != routes8[L][0][0]).any(-1).sum()),
            "tokens": int(routes[L][0][0].shape[0]),
            "min_topk_margin": float(routes[L][0][1].min()),
        }
        for L in sorted(routes)
    }
    la, lb = torch.cat(a.logits), torch.cat(b.logits)
    layers = []
    for L in sorted(free8):
        layers.append(
            {"layer": L, "hidden_cos_min": cos_min(torch.cat(inputs[L + 1]), torch.cat(free8[L]))} | forced[L]
        )
    return {
        "tokens": sum(len(r) for r in ids),
        "logits_cos_min": cos_min(la, lb),
        "top1": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
        "layers": layers,
        "routing": routing,
        "seconds": {"bf16": round(t_bf16, 1), "fp8 (+ teacher-forced)": round(t_fp8, 1)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp/cond"))
    ap.add_argument("--shapes", nargs="+", default=["tiny", "v3"], choices=["tiny", "v3"])
    ap.add_argument("--profiles", nargs="+", default=["trained", "random"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__}, "runs": {}}
    for shape in args.shapes:
        for profile in args.profiles:
            path = args.workdir / f"{shape}-{profile}"
            if not (path / "config.json").is_file():
                t = time.perf_counter()
                experts = args.experts if shape == "v3" else None
                synth(path, geometry(shape, args.layers), dtype="fp8", seed=0, shards=4, experts=experts,
                      mtp=0, profile=profile)  # fmt: skip
                print(f"synth {shape} {profile}: {time.perf_counter() - t:.0f} s", flush=True)
            r = measure(path)
            out["runs"][f"{shape} {profile}"] = r
            per = ", ".join(
                f"L{x['layer']}: cos {x['hidden_cos_min']:.5f}, forced {x['rel_max']:.3f}/{abs(x['gain'] - 1):.1e}"
                for x in r["layers"]
            )
            rt = ", ".join(f"L{L}: {x['tokens_with_other_experts']}/{x['tokens']} other experts, margin "
                           f"{x['min_topk_margin']:.1e}" for L, x in r["routing"].items())  # fmt: skip
            print(f"{shape:5s} {profile:8s} logits cos min {r['logits_cos_min']:.6f} top-1 {r['top1']:.4f} | {per}"
                  f" | {rt} | {r['seconds']}", flush=True)  # fmt: skip
            if not args.keep and shape == "v3":
                import shutil

                shutil.rmtree(path)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
