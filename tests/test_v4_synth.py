"""synth on DeepSeek-V4: the released file layout, the tensor set of the table read back by safetensors' own reader,
FP4 experts packed as the official code reads them (decoded here by tests/v4_ref.py), E8M0 scales by the ue8m0 rule,
I64 hash routing tables, -Base and BF16 variants, tokenizer files as V4 ships them, same seed same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from v4_ref import E4M3, E8M0, fp4_values, read_folder

from dsv3_tools.family import load_config
from dsv3_tools.synth import folder_digest, plan_synth, synth
from dsv3_tools.v4 import names as V

INDEX = "model.safetensors.index.json"


def test_same_seed_same_bytes(tiny_v4: Path, tmp_path: Path) -> None:
    synth(tmp_path / "a", "tiny-v4", seed=0)
    assert folder_digest(tmp_path / "a") == folder_digest(tiny_v4)
    synth(tmp_path / "b", "tiny-v4", seed=2)
    assert folder_digest(tmp_path / "b") != folder_digest(tiny_v4)


def test_released_layout_and_index(tiny_v4: Path) -> None:
    """embed alone in file 1, layer L in file L + 2, head/norm/hc_head next, the MTP module last; 5-digit names."""
    cfg = load_config(tiny_v4)
    L = cfg.num_hidden_layers
    k = L + 3
    index = json.loads((tiny_v4 / INDEX).read_text())
    wm = index["weight_map"]
    assert sorted(set(wm.values())) == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
    assert [n for n, f in wm.items() if f.startswith("model-00001-")] == ["embed.weight"]
    for n, f in wm.items():
        if n.startswith("layers."):
            assert f == f"model-{int(n.split('.')[1]) + 2:05d}-of-{k:05d}.safetensors", n
        elif n.startswith("mtp."):
            assert f == f"model-{k:05d}-of-{k:05d}.safetensors", n
        elif n != "embed.weight":
            assert f == f"model-{L + 2:05d}-of-{k:05d}.safetensors", n
    tensors = read_folder(tiny_v4)
    assert set(wm) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in sorted(set(wm.values())):
        with safe_open(str(tiny_v4 / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}


def test_tensor_set_and_dtypes(tiny_v4: Path) -> None:
    cfg = load_config(tiny_v4)
    tensors = read_folder(tiny_v4)
    want = V.expected_tensors(cfg, V.Format("fp8", "fp4", "F8_E8M0"))
    assert set(tensors) == set(want)
    st = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}
    st |= {torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8", torch.int64: "I64"}
    for n, t in tensors.items():
        assert (st[t.dtype], tuple(t.shape)) == (want[n].dtype, want[n].shape), n
    # hash routing: the first num_hash_layers layers, K distinct expert ids per token, all in range
    ids = tensors["layers.0.ffn.gate.tid2eid"]
    assert ids.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg.n_routed_experts
    assert all(len(set(r)) == cfg.num_experts_per_tok for r in ids.tolist())
    assert "layers.2.ffn.gate.bias" in tensors and "layers.2.ffn.gate.tid2eid" not in tensors


def test_fp4_experts_and_e8m0_scales_follow_the_rules(tiny_v4: Path) -> None:
    """FP4 groups: scale 2**ceil(log2(amax / 6)), so amax / scale is in (3, 6] and rounds to 3, 4 or 6 (x scale);
    FP8 blocks with ue8m0 scales: largest |q| in (224, 448]; scales vary (a misplaced scale would show)."""
    t = read_folder(tiny_v4)
    w, s = t["layers.1.ffn.experts.3.w2.weight"], t["layers.1.ffn.experts.3.w2.scale"]
    v = fp4_values(w, s)
    per_group = v.abs().view(v.shape[0], -1, 32).amax(-1) / E8M0[s.view(torch.uint8).long()]
    assert set(per_group.flatten().tolist()) <= {3.0, 4.0, 6.0}
    assert len(set(s.view(torch.uint8).flatten().tolist())) > 3
    q, sc = t["layers.1.attn.wo_b.weight"], t["layers.1.attn.wo_b.scale"]
    qa = E4M3[q.view(torch.uint8).long()].abs().view(2, 128, 4, 128).amax(dim=(1, 3))
    assert bool(((qa > 224) & (qa <= 448)).all())
    assert len(set(sc.view(torch.uint8).flatten().tolist())) > 1


def test_base_and_bf16_variants(tiny_v4_base: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_v4_base / "config.json").read_text())
    assert cfg["expert_dtype"] == "fp8" and "scale_fmt" not in cfg["quantization_config"]
    t = read_folder(tiny_v4_base)
    assert t["layers.0.ffn.experts.0.w1.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.0.ffn.experts.0.w1.scale"].dtype == torch.float32
    assert t["layers.0.attn.wq_a.scale"].dtype == torch.float32
    synth(tmp_path / "bf", "tiny-v4", dtype="bf16")
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    t = read_folder(tmp_path / "bf")
    assert not [n for n in t if V.is_scale(n)] and t["layers.0.ffn.experts.0.w1.weight"].dtype == torch.bfloat16


def test_tokenizer_files_as_v4_ships_them(tiny_v4: Path) -> None:
    from tokenizers import Tokenizer

    tc = json.loads((tiny_v4 / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["add_bos_token"] is False
    assert "chat_template" not in tc and tc["model_max_length"] == 1048576
    gc = json.loads((tiny_v4 / "generation_config.json").read_text())
    assert (gc["temperature"], gc["top_p"], gc["do_sample"]) == (1.0, 1.0, True)
    tok = Tokenizer.from_file(str(tiny_v4 / "tokenizer.json"))
    assert tok.decode(tok.encode("hello world").ids) == "hello world"


def test_flash_geometry_plans_without_writing(tmp_path: Path) -> None:
    """``synth --config deepseek-v4-flash --layers 2 --experts 4``: the real shapes at reduced depth (planned only:
    the embedding alone is 1 GB)."""
    plan = plan_synth(tmp_path / "f", "deepseek-v4-flash", layers=2, experts=4)
    assert plan.dtype == "fp4" and not (tmp_path / "f").exists()
    assert [len(f) for f in plan.files][0] == 1 and len(plan.files) == 2 + 3  # embed, 2 layers, top, MTP
    names = {s.name: s for f in plan.files for s in f}
    assert names["layers.1.ffn.experts.3.w1.weight"].shape == (2048, 2048)
    assert names["layers.0.ffn.gate.tid2eid"].shape == (129280, 4)
    assert plan_synth(tmp_path / "g", "deepseek-v4-flash-base", layers=1).dtype == "fp8"


def test_bad_options(tmp_path: Path) -> None:
    from dsv3_tools.errors import ConfigError

    with pytest.raises(ConfigError, match="fp4, fp8, bf16"):
        plan_synth(tmp_path / "x", "tiny-v4", dtype="fp16")
    with pytest.raises(ConfigError, match="scale-fmt"):
        plan_synth(tmp_path / "x", "tiny-v4", scale_fmt="ue8m0")
    with pytest.raises(ConfigError, match="dense-layers"):
        plan_synth(tmp_path / "x", "tiny-v4", dense_layers=1)
    with pytest.raises(ConfigError, match="exceeds"):
        plan_synth(tmp_path / "x", "tiny-v4", layers=9)
