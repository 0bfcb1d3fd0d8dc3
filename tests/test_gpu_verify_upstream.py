"""``benchmarks/gpu_verify_upstream.py`` off the GPU: the upstream demo (from ``DSV3_UPSTREAM_DIR``, never copied)
with our plain-torch kernels standing in for its Triton ones, each of its blocks run on our reference's layer
inputs (teacher forcing), on the tiny well-conditioned model. Skipped when ``DSV3_UPSTREAM_DIR`` is not set.

In float32 with exactly dequantized weights the demo and our model compute the same function (FORMAT.md: checked
against transformers to ~1e-6), so each demo layer must reproduce our reference's layer within the ``float`` tier's
layer limits; on the demo's FP8 path, within the ``quantized`` tier's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.verify import verify_checkpoint
from dsv3_tools.verify.metrics import TIERS
from dsv3_tools.verify.reference import load_reference

UPSTREAM = os.environ.get("DSV3_UPSTREAM_DIR")
pytestmark = pytest.mark.skipif(not UPSTREAM, reason="DSV3_UPSTREAM_DIR (the upstream demo's inference folder) not set")


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_verify_upstream.py"
    spec = importlib.util.spec_from_file_location("gpu_verify_upstream", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ref(tiny_trained_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("up") / "ref.safetensors"
    assert verify_checkpoint(tiny_trained_fp8, save_reference=p).verdict == "pass"
    return p


def test_demo_layers_reproduce_ours_teacher_forced(tiny_trained_fp8: Path, ref: Path) -> None:
    g = _script()
    demo = g.load_upstream(UPSTREAM, kernels="torch")
    ck, r = open_checkpoint(tiny_trained_fp8), load_reference(ref)
    want = torch.stack(g.last_rows(r))
    for gemm, tier in (("bf16", "float"), ("fp8", "quantized")):
        th = TIERS[tier]
        got = g.run_upstream(demo, ck, r, gemm=gemm, device="cpu", dtype=torch.float32)
        assert sorted(got["layers"]) == [0, 1, 2]
        for L, s in got["layers"].items():
            assert s.rel_max <= th.max_layer_err and abs(s.gain - 1) <= th.max_gain_dev, (gemm, L, s)
        c = g.cos(torch.stack(got["last_logits"]), want)
        assert c >= (0.999999 if gemm == "bf16" else th.min_cos), (gemm, c)
    # The router bias is attached: the demo makes one only for dim 7168, and without it layer 1 (MoE) would route
    # otherwise than ours.
    block = g.upstream_block(demo, g.upstream_args(demo, ck.config), ck, 1, "cpu")
    assert block.ffn.gate.bias is not None and torch.equal(
        block.ffn.gate.bias.detach(), ck.read("model.layers.1.mlp.gate.e_score_correction_bias")
    )


def test_script_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    g = _script()
    out = tmp_path / "out.json"
    argv = ["--upstream", UPSTREAM, "--dir", str(tmp_path / "w"), "--config", "tiny", "--layers", "3", "--dense", "1"]
    argv += ["--experts", "8", "--device", "cpu", "--kernels", "torch", "--json", str(out)]
    assert g.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows["exact (same run)"]["tier"] == "exact" and rows["ours --gemm fp8 (float32)"]["tier"] == "quantized"
    assert [x["layer"] for x in rows["demo gemm_impl fp8 (bfloat16)"]["layers"]] == [0, 1, 2]
    assert all(x["rel_max"] == 0.0 for x in rows["exact (same run)"]["layers"])
