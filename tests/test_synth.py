"""synth: deterministic bytes, the real HF format, a scale stored apart from its weight, a working tokenizer,
ue8m0 scales, and logits that are not degenerate (checked with transformers, independently of our model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv3_tools.config import ModelConfig
from dsv3_tools.synth import derive_config, folder_digest, synth


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def test_same_seed_same_bytes_and_other_seed_differs(tiny_fp8: Path, tmp_path: Path) -> None:
    synth(tmp_path / "a", "tiny", seed=0, shards=4)
    assert folder_digest(tmp_path / "a") == folder_digest(tiny_fp8)
    synth(tmp_path / "b", "tiny", seed=1, shards=4)
    assert folder_digest(tmp_path / "b") != folder_digest(tiny_fp8)


def test_hf_format_index_and_split_scale(tiny_fp8: Path) -> None:
    index = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())
    t = _all_tensors(tiny_fp8)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    wm = index["weight_map"]
    apart = [w for w in wm if w + "_scale_inv" in wm and wm[w] != wm[w + "_scale_inv"]]
    assert apart, "at least one weight's scale must live in another file"
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_fp8 / f).is_file()
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert any(k.startswith("model.layers.3.") for k in t)  # the MTP layer


def test_fp8_weights_dequantize_close_to_magnitudes_and_scales_vary(tiny_fp8: Path) -> None:
    t = _all_tensors(tiny_fp8)
    w = t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    s = t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert w.shape == (224, 320) and s.shape == (2, 3)
    # plain dequant: every block's max |value| is 448 * its scale (the amax/448 recipe)
    wf = w.float()
    for bi in range(2):
        for bj in range(3):
            blk = wf[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert blk.abs().max().item() == 448.0, (bi, bj)
    assert s.max() / s.min() > 1.3  # blocks have different magnitudes


def test_ue8m0_scales_are_powers_of_two(tiny_fp8_ue8m0: Path) -> None:
    t = _all_tensors(tiny_fp8_ue8m0)
    cfg = json.loads((tiny_fp8_ue8m0 / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    scales = [v for k, v in t.items() if k.endswith("_scale_inv")]
    assert scales
    for s in scales:
        m, _ = torch.frexp(s)
        assert torch.all(m == 0.5), "every ue8m0 scale must be an exact power of two"


def test_tokenizer_round_trips_text(tiny_fp8: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_fp8 / "tokenizer.json"))
    enc = tok.encode("hello world, the quick brown fox")
    assert enc.ids[0] == 0  # BOS
    assert max(enc.ids) < 512
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello world, the quick brown fox"
    assert len(enc.ids) < len("hello world, the quick brown fox")  # merges apply


def test_logits_are_not_degenerate(tiny_bf16: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    m = DeepseekV3ForCausalLM.from_pretrained(str(tiny_bf16), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 512, (8, 6), generator=g)
    with torch.no_grad():
        top1 = m(ids).logits[:, -1].argmax(-1)
    assert len(set(top1.tolist())) >= 5, top1


def test_reduced_depth_keeps_real_v3_shapes() -> None:
    cfg = derive_config(ModelConfig.builtin("deepseek-v3"), layers=4, experts=16)
    assert cfg.num_hidden_layers == 4 and cfg.first_k_dense_replace == 3 and cfg.n_routed_experts == 16
    assert cfg.hidden_size == 7168 and cfg.moe_intermediate_size == 2048 and cfg.kv_lora_rank == 512


def test_bad_options(tmp_path: Path) -> None:
    from dsv3_tools.errors import ConfigError, OutputError

    with pytest.raises(ConfigError):
        synth(tmp_path / "x", "tiny", dtype="fp16")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("x")
    with pytest.raises(OutputError):
        synth(tmp_path / "y", "tiny")
