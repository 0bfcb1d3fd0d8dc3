"""``generate --speculative mtp`` against plain greedy decoding: same tokens, the acceptance rate, the cost.

    python benchmarks/bench_speculative.py --workdir /tmp/spec [--config tiny] [--profile random] [--device cpu]

Writes a synthetic checkpoint (with its MTP module), then for batch 1 and 4 runs the same greedy requests
(``--new`` tokens each, EOS ignored) plain and speculative, eagerly (no CUDA graph on either side; on CUDA both
again through their CUDA graphs), and reports
milliseconds per generated token, the drafts accepted, and whether the tokens are identical. On random weights the
MTP module's drafts are nearly all wrong, so this measures what speculation costs when it does not pay: each step
runs two rows per sequence through the main model and one more block (the MTP module) for the next draft.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.generate.batch import Request
from dsv3_tools.generate.chat import Tokenizer
from dsv3_tools.generate.engine import Engine
from dsv3_tools.generate.sampling import SamplingParams
from dsv3_tools.model import load_model
from dsv3_tools.synth import synth


def run(
    ck,
    tok,
    device: str,
    batch: int,
    new: int,
    speculative: bool,
    vocab: int,
    graph: bool = False,
    invariant: bool | None = None,
) -> tuple[float, list, list]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    engine = "triton" if device.startswith("cuda") else "torch"
    model = load_model(ck, device=device, engine=engine, stream=False, dtype=dtype, batch_invariant=invariant)
    eng = Engine(model, tok, batch, 64 + new + 2, ignore_eos=True, speculative=speculative, cuda_graph=graph)
    g = torch.Generator().manual_seed(1)
    reqs = [
        Request(i, "", torch.randint(0, vocab, (16 + 8 * i,), generator=g).tolist(), SamplingParams(0.0), new, (), i)
        for i in range(batch)
    ]
    eng.run(reqs[:1])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = eng.run(reqs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    s = time.perf_counter() - t
    return 1e3 * s / sum(len(r.output_ids) for r in out), [r.output_ids for r in out], [r.speculative for r in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-speculative"))
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--profile", default="random")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                    help="decode on kernels/rowwise.py (CUDA; default: the model's, on)")  # fmt: skip
    args = ap.parse_args()
    ckpt = args.workdir / f"{args.config}-{args.profile}"
    if not (ckpt / "config.json").is_file():
        synth(ckpt, args.config, layers=args.layers, experts=args.experts, profile=args.profile)
    ck, tok = open_checkpoint(ckpt), Tokenizer.load(ckpt)
    rows = []
    inv = args.batch_invariant
    for batch in (1, 4):
        plain_ms, plain_ids, _ = run(ck, tok, args.device, batch, args.new, False, ck.config.vocab_size, False, inv)
        spec_ms, spec_ids, spec = run(ck, tok, args.device, batch, args.new, True, ck.config.vocab_size, False, inv)
        drafted, accepted = sum(x["drafted"] for x in spec), sum(x["accepted"] for x in spec)
        rows.append({
            "batch": batch, "plain_ms_per_token": round(plain_ms, 3), "speculative_ms_per_token": round(spec_ms, 3),
            "cost": round(spec_ms / plain_ms, 3), "drafts": drafted, "accepted": accepted,
            "identical_tokens": plain_ids == spec_ids,
        })  # fmt: skip
        if args.device.startswith("cuda"):  # plain decoding at its fastest: the step in a CUDA graph
            graph_ms, graph_ids, _ = run(ck, tok, args.device, batch, args.new, False, ck.config.vocab_size, True, inv)
            sg_ms, sg_ids, sg = run(ck, tok, args.device, batch, args.new, True, ck.config.vocab_size, True, inv)
            rows[-1] |= {
                "plain_graph_ms_per_token": round(graph_ms, 3), "speculative_graph_ms_per_token": round(sg_ms, 3),
                "cost_graphs": round(sg_ms / graph_ms, 3), "accepted_graph": sum(x["accepted"] for x in sg),
                "identical_tokens_graph": graph_ids == spec_ids == sg_ids,
            }  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    machine = {"device": args.device, "torch": torch.__version__, "python": platform.python_version()}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"machine": machine, "args": vars(args) | {"workdir": str(args.workdir)}, "rows": rows}))


if __name__ == "__main__":
    main()
