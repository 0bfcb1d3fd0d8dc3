"""generate's speed on a GPU, side by side with the upstream demo's model in the same process.

Model: real DeepSeek-V3 shapes cut to 4 layers (1 dense + 3 MoE) and 64 routed experts, FP8 with 128x128 scales
(``synth --config deepseek-v3 --layers 4 --dense-layers 1 --experts 64``). Measured, for ours (``--gemm bf16``:
weights dequantized once at load; the decode step captured in a CUDA graph, the chosen experts through
``kernels/moe_gemm.py``) and for the upstream demo (``--upstream DIR``: its ``model.py`` imported from there, never
copied; its default path, which dequantizes FP8 weights at every step):

- prefill tokens/s for 1x512, 4x1024 and 1x4096 tokens (median of 3 after a warm-up);
- decode ms/step at batch 1, 4 and 32 after a 512-token prefill (median of 50 steps), on the default decode
  kernels (batch-invariant: ``kernels/rowwise.py``) and on cuBLAS GEMMs, torch's reductions and einsum attention
  (``generate --no-batch-invariant``: ``decode_ms_cublas``);
- the step's floor: the bytes of weights one step touches (batch 1: every attention and dense weight, the shared
  expert, the 8 chosen experts of each MoE layer, the head) over the device's copy bandwidth measured here, and the
  step's share of it;
- the peak of GPU memory, and whether a step ever waits for the host (``torch.cuda.set_sync_debug_mode("error")``
  around an eager step, and a profiler count of device synchronizations in a replayed step).

    python benchmarks/gpu_generate.py --upstream ../shared/upstream/deepseek-v3/inference --workdir /tmp/gen
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv3_tools import names as N
from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.generate.graphs import GraphDecoder
from dsv3_tools.model import load_model
from dsv3_tools.modelargs import demo_model_args
from dsv3_tools.synth import synth

PREFILL = [(1, 512), (4, 1024), (1, 4096)]
DECODE = [1, 4, 32]


def timed(fn, warmup: int = 1, repeat: int = 3) -> float:
    """Median seconds of ``fn`` (device synchronized around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + written)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), warmup=2, repeat=10)
    return 2 * a.numel() / s


def step_bytes(cfg, chosen: int, esize: int = 2) -> int:
    """Bytes of weights one decode step of one token reads (BF16 weights: ``esize`` 2)."""
    total = 0
    for spec in N.expected_tensors(cfg, mtp=False).values():
        n = spec.parsed
        if n.is_scale or n.module.hf == "model.embed_tokens":
            continue
        numel = 1
        for s in spec.shape:
            numel *= s
        if n.expert is not None:
            numel = numel * chosen / cfg.n_routed_experts  # the chosen experts of this layer only
        total += numel * (4 if spec.dtype == "F32" else esize)
    return int(total + cfg.hidden_size * esize)  # + one embedding row


def ours(ck, args) -> dict:
    model = load_model(ck, device="cuda", engine="triton", gemm="bf16", stream=False, dtype=torch.bfloat16)
    default_invariant = model.env.invariant_decode
    cfg = ck.config
    g = torch.Generator().manual_seed(0)
    res: dict = {"prefill_tokens_per_s": {}, "decode_ms": {}, "decode_eager_ms": {}}
    for B, T in PREFILL if not args.skip_prefill else []:
        cache = model.new_cache(B, T)
        prompts = [torch.randint(0, cfg.vocab_size, (T,), generator=g).tolist() for _ in range(B)]
        s = timed(lambda p=prompts, c=cache: model.prefill(p, c))
        res["prefill_tokens_per_s"][f"{B}x{T}"] = round(B * T / s)

    def setup(B: int):
        cache = model.new_cache(B, args.max_len)
        graphs = GraphDecoder(model, cache)
        graphs.ensure(B)
        prompts = [torch.randint(0, cfg.vocab_size, (512,), generator=g).tolist() for _ in range(B)]
        model.prefill(prompts, cache)
        tokens = torch.randint(0, cfg.vocab_size, (B,), generator=g).cuda()
        positions = torch.full((B,), 512, dtype=torch.long, device="cuda")
        return cache, graphs, tokens, positions

    for B in DECODE:
        cache, graphs, tokens, positions = setup(B)
        res["decode_ms"][B] = round(1e3 * timed(lambda g=graphs, t=tokens, p=positions: g(t, p), 5, 50), 3)

        def eager(t=tokens, p=positions, c=cache) -> torch.Tensor:
            return model.decode(t, p, c, kv_len=args.max_len, static=True)

        res["decode_eager_ms"][B] = round(1e3 * timed(eager, warmup=2, repeat=10), 3)
        if B == 1:
            torch.cuda.set_sync_debug_mode("error")
            try:
                eager()
                res["eager_step_host_syncs"] = "none (sync debug mode: error)"
            except RuntimeError as e:
                res["eager_step_host_syncs"] = f"FOUND: {str(e).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                graphs(tokens, positions)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events()]
            res["replay_profile"] = {
                "graph_launches": sum("cudaGraphLaunch" in n for n in names),
                "synchronizing_calls_inside": sum(
                    ("Synchronize" in n or "MemcpyDtoH" in n or n == "aten::item") for n in names
                )
                - 1,  # the benchmark's own torch.cuda.synchronize() after the replay
            }
    res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    res["decode_batch_invariant"] = default_invariant
    other = "decode_ms_cublas" if default_invariant else "decode_ms_batch_invariant"
    model.env.invariant_decode = not default_invariant  # the other decode kernels (generate --[no-]batch-invariant)
    res[other] = {}
    for B in DECODE:
        cache, graphs, tokens, positions = setup(B)
        res[other][B] = round(1e3 * timed(lambda g=graphs, t=tokens, p=positions: g(t, p), 5, 50), 3)
        del cache, graphs
    model.env.invariant_decode = default_invariant
    return res


def upstream(ck, args) -> dict:
    """The demo's Transformer on the same weights (its MP-1 names), timed the way its generate.py runs it."""
    sys.path.insert(0, str(args.upstream))
    import model as up  # the upstream demo's model.py

    cfg = ck.config
    # read on the host first: the demo builds its model under a CUDA default device, which would also place the
    # reader's staging buffers on the GPU
    sd = {N.parse_hf(name).mp: ck.read(name).cuda() for name in ck.tensors}
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    try:
        margs = demo_model_args(cfg) | {"max_batch_size": max(DECODE), "max_seq_len": max(t for _, t in PREFILL) + 64}
        m = up.Transformer(up.ModelArgs(**margs))
        m.load_state_dict(sd, strict=True)
        del sd
        g = torch.Generator().manual_seed(0)
        res: dict = {"prefill_tokens_per_s": {}, "decode_ms": {}}
        for B, T in PREFILL if not args.skip_prefill else []:
            tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g, device="cpu").cuda()
            s = timed(lambda t=tokens: m.forward(t, 0))
            res["prefill_tokens_per_s"][f"{B}x{T}"] = round(B * T / s)
        for B in DECODE:
            tokens = torch.randint(0, cfg.vocab_size, (B, 513), generator=g, device="cpu").cuda()
            m.forward(tokens[:, :512], 0)
            res["decode_ms"][B] = round(1e3 * timed(lambda t=tokens: m.forward(t[:, 512:513], 512), 5, 50), 3)
        res["gemm_impl"], res["attn_impl"] = up.gemm_impl, up.attn_impl
        return res
    finally:
        torch.set_default_device("cpu")
        torch.set_default_dtype(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-generate"))
    ap.add_argument("--upstream", type=Path, default=None, help="the upstream demo's inference/ folder")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024, help="cache length for the decode measurements")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-prefill", action="store_true", help="decode only (both sides)")
    args = ap.parse_args()
    ckpt = args.workdir / "v3-slice"
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        synth(ckpt, "deepseek-v3", dtype="fp8", layers=args.layers, dense_layers=args.dense_layers,
              experts=args.experts, mtp=0, shards=8)  # fmt: skip
        print(f"synth: {time.perf_counter() - t:.0f} s", flush=True)
    ck = open_checkpoint(ckpt)
    cfg = ck.config
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": round(bw / 1e9), "ours": ours(ck, args)}
    torch.cuda.empty_cache()  # our model is gone with ours(): room for the upstream one
    nbytes = step_bytes(cfg, cfg.num_experts_per_tok)
    floor_ms = 1e3 * nbytes / bw
    out["step_bytes_batch1"] = nbytes
    out["step_floor_ms_batch1"] = round(floor_ms, 3)
    out["ours"]["share_of_floor_batch1"] = round(floor_ms / out["ours"]["decode_ms"][1], 3)
    print(json.dumps(out, indent=1), flush=True)
    if args.upstream is not None:
        out["upstream"] = upstream(ck, args)
        out["speedup_decode"] = {
            B: round(out["upstream"]["decode_ms"][B] / out["ours"]["decode_ms"][B], 2) for B in DECODE
        }
        out["speedup_prefill"] = {
            k: round(out["ours"]["prefill_tokens_per_s"][k] / v, 2)
            for k, v in out["upstream"]["prefill_tokens_per_s"].items()
        }
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_generate.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
