"""DeepSeek-V4 configs and the V4 name table, against numbers taken from the released checkpoints' own headers and
the Hub (docs/format-v4.md 1, 2.3, 2.4): tensor counts, bytes, per-dtype counts and element totals are not computed
by the code under test, so the table has to reproduce them."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from dsv3_tools.config import ModelConfig, builtin_config_path
from dsv3_tools.errors import ConfigError, UnknownNameError, UnsupportedModelError
from dsv3_tools.family import config_from_dict, load_config
from dsv3_tools.stfile import nbytes
from dsv3_tools.v4 import names as V
from dsv3_tools.v4.config import V4Config

FP4 = V.Format("fp8", "fp4", "F8_E8M0")  # the released Flash / Pro
BASE = V.Format("fp8", "fp8", "F32")  # -Base, per two non-official sources

# (tensors, bytes = index total_size, per-dtype counts, MTP tensors, elements as the Hub counts them)
RELEASED = {
    "deepseek-v4-flash": (
        69_187,
        159_609_485_896,
        {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167, "I64": 3, "I8": 33_792},
        1_575,
        158_069_433_298,
    ),
    "deepseek-v4-pro": (
        145_116,
        864_704_792_696,
        {"BF16": 619, "F32": 590, "F8_E4M3": 528, "F8_E8M0": 71_952, "I64": 3, "I8": 71_424},
        2_343,
        861_608_274_846,
    ),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_table_reproduces_the_released_checkpoints(name: str) -> None:
    count, total, by_dtype, mtp, elements = RELEASED[name]
    cfg = load_config(name)
    ex = V.expected_tensors(cfg, FP4)
    assert len(ex) == count
    assert sum(nbytes(s.dtype, s.shape) for s in ex.values()) == total
    assert dict(Counter(s.dtype for s in ex.values())) == by_dtype
    assert sum(1 for n in ex if n.startswith("mtp.")) == mtp
    assert sum(math.prod(s.shape) for s in ex.values()) == elements


def test_base_tensor_set() -> None:
    """-Base: the same names with FP8 experts and F32 scales; 67,612 tensors outside the MTP module ([3p])."""
    cfg = load_config("deepseek-v4-flash-base")
    assert cfg.expert_dtype == "fp8" and cfg.quant is not None and cfg.quant.scale_fmt is None
    ex = V.expected_tensors(cfg, BASE)
    assert set(ex) == set(V.expected_tensors(load_config("deepseek-v4-flash"), FP4))
    assert sum(1 for n in ex if not n.startswith("mtp.")) == 67_612
    w = ex["layers.5.ffn.experts.17.w2.weight"]
    assert (w.dtype, w.shape) == ("F8_E4M3", (4096, 2048))
    assert (ex[w.scale].dtype, ex[w.scale].shape) == ("F32", (32, 16))


def test_flash_shapes_from_the_format_doc() -> None:
    ex = V.expected_tensors(load_config("deepseek-v4-flash"), FP4)

    def at(n: str) -> tuple[str, tuple[int, ...]]:
        return ex[n].dtype, ex[n].shape

    assert at("embed.weight") == ("BF16", (129280, 4096))
    assert at("hc_head_fn") == ("F32", (4, 16384))
    assert at("layers.0.hc_attn_fn") == ("F32", (24, 16384))
    assert at("layers.0.attn.wo_a.weight") == ("F8_E4M3", (8192, 4096))
    assert at("layers.0.attn.wo_a.scale") == ("F8_E8M0", (64, 32))
    assert at("layers.0.attn.wo_b.scale") == ("F8_E8M0", (32, 64))
    assert at("layers.0.ffn.gate.tid2eid") == ("I64", (129280, 6))
    assert "layers.0.ffn.gate.bias" not in ex and "layers.3.ffn.gate.tid2eid" not in ex
    assert at("layers.3.ffn.gate.bias") == ("F32", (256,))
    assert at("layers.3.ffn.experts.255.w1.weight") == ("I8", (2048, 2048))
    assert at("layers.3.ffn.experts.255.w1.scale") == ("F8_E8M0", (2048, 128))
    assert at("layers.3.ffn.experts.0.w2.scale") == ("F8_E8M0", (4096, 64))
    # compress_ratios: layers 0, 1 sliding only; 2 is 4 (compressor of width 2d, indexer); 3 is 128 (no indexer)
    assert "layers.1.attn.compressor.ape" not in ex
    assert at("layers.2.attn.compressor.ape") == ("F32", (4, 1024))
    assert at("layers.2.attn.indexer.compressor.ape") == ("F32", (4, 256))
    assert at("layers.3.attn.compressor.ape") == ("F32", (128, 512))
    assert "layers.3.attn.indexer.wq_b.weight" not in ex
    # MTP: a bias gate (layer id 43 >= num_hash_layers), no compressor (ratio 0), e_proj / h_proj FP8, no embed/head
    assert at("mtp.0.e_proj.scale") == ("F8_E8M0", (32, 32))
    assert "mtp.0.ffn.gate.bias" in ex and "mtp.0.attn.compressor.ape" not in ex
    assert not [n for n in ex if n.startswith("mtp.") and ("emb" in n or n.endswith("head.weight"))]


@pytest.mark.parametrize(
    "name",
    ["layers.0.attn.wq.weight", "model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.q_norm.scale",
     "mtp.0.ffn.experts.1.w4.weight", "layers.0.e_proj.weight", "layers.x.attn_norm.weight", "norm.scale", "lm_head"],
)  # fmt: skip
def test_unknown_names_fail_closed(name: str) -> None:
    with pytest.raises(UnknownNameError) as e:
        V.parse(name)
    assert repr(name) in str(e.value)


def test_parse_fields() -> None:
    cfg = load_config("deepseek-v4-flash")
    n = V.parse("mtp.0.ffn.experts.7.w2.scale")
    assert n.scale and n.mtp and n.expert == 7 and n.split == V.EXPERT and n.layer(cfg) == 43
    assert n.weight == "mtp.0.ffn.experts.7.w2.weight" and n.name == "mtp.0.ffn.experts.7.w2.scale"
    assert V.parse("layers.2.attn.indexer.weights_proj.weight").split == 0
    assert V.parse("layers.2.attn.wo_b.scale").split == 1
    assert V.parse("layers.2.ffn.shared_experts.w2.weight").split is None
    assert V.parse("hc_head_scale").row.scope == "top" and V.parse("mtp.0.hc_head_scale").row.scope == "mtp"


def test_configs_and_derived_values() -> None:
    flash = load_config("deepseek-v4-flash")
    assert isinstance(flash, V4Config) and flash.expert_dtype is None  # the 0825add config has no expert_dtype
    assert flash.to_hf_dict() == json.loads(builtin_config_path("deepseek-v4-flash").read_text())
    assert list(flash.mtp_layers) == [43] and flash.ratio(43) == 0 and flash.num_hash_layers == 3
    pro = load_config("deepseek-v4-pro")
    assert (pro.hidden_size, pro.o_groups, pro.n_routed_experts, pro.routed_scaling_factor) == (7168, 16, 384, 2.5)
    small = flash.with_layers(2).with_experts(4)
    assert small.compress_ratios == (0, 0, 0) and small.num_hash_layers == 2 and small.num_experts_per_tok == 4
    assert config_from_dict(small.to_hf_dict()) == small
    tiny = load_config("tiny-v4")
    # what the tiny V4 geometry exercises: every layer kind, hash and bias gates, MTP, 128-aligned FP8 dims
    assert set(tiny.compress_ratios[: tiny.num_hidden_layers]) == {0, 4, 128}
    assert 0 < tiny.num_hash_layers < tiny.num_hidden_layers and tiny.num_nextn_predict_layers == 1


def test_v3_reader_refuses_v4_and_v41_is_refused_in_one_line() -> None:
    d = json.loads(builtin_config_path("deepseek-v4-flash").read_text())
    with pytest.raises(ConfigError, match="not a DeepSeek-V3-family type"):
        ModelConfig.from_dict(d)
    v41 = {"model_type": "deepseek_v41", "architectures": ["DeepseekV41ForCausalLM"], "text_config": {}}
    with pytest.raises(UnsupportedModelError) as e:
        config_from_dict(v41)
    assert "V4.1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnsupportedModelError):
        config_from_dict({"model_type": "x", "text_config": {"model_type": "deepseek_v41_text"}})


@pytest.mark.parametrize(
    "edit,msg",
    [({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"), ({"kv_lora_rank": 512}, "unknown field"),
     ({"n_shared_experts": 2}, "exactly one shared expert"), ({"o_groups": 7}, "not divisible by o_groups"),
     ({"expert_dtype": "int4"}, "expert_dtype"), ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
      "weight_block_size": [32, 32]}}, "weight_block_size")],
)  # fmt: skip
def test_bad_v4_configs(edit: dict, msg: str) -> None:
    d = json.loads(builtin_config_path("tiny-v4").read_text()) | edit
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(d)


def test_mp_layout_of_the_official_converter() -> None:
    """Per rank: wo_a BF16 without scale, experts F4 [out, in] and whole, splits per convert.py (format-v4.md 5.3)."""
    cfg = load_config("deepseek-v4-flash").with_layers(3)
    r1 = V.expected_mp_tensors(cfg, FP4, 1, 8)
    assert (r1["layers.0.attn.wo_a.weight"].dtype, r1["layers.0.attn.wo_a.weight"].shape) == ("BF16", (1024, 4096))
    assert "layers.0.attn.wo_a.scale" not in r1
    assert r1["layers.0.attn.wo_b.scale"].shape == (32, 8) and r1["layers.0.attn.attn_sink"].shape == (8,)
    assert r1["layers.2.attn.indexer.weights_proj.weight"].shape == (8, 4096)
    assert r1["embed.weight"].shape == (16160, 4096) and r1["head.weight"].shape == (16160, 4096)
    w = r1["layers.0.ffn.experts.32.w1.weight"]
    assert (w.dtype, w.shape) == ("F4", (2048, 4096)) and "layers.0.ffn.experts.31.w1.weight" not in r1
    assert r1["layers.0.ffn.shared_experts.w1.weight"].shape == (2048, 4096)  # replicated
    assert r1["mtp.0.e_proj.weight"].shape == (4096, 4096)  # the MTP module stays in the rank files
    assert sum(1 for n in r1 if ".experts." in n and "shared" not in n) == 4 * 32 * 6  # 3 layers + MTP
