"""The name table and expected tensor set, checked against FORMAT.md's table (numbers typed in from it)."""

from __future__ import annotations

import pytest

from dsv3_tools import names as N
from dsv3_tools.config import ModelConfig
from dsv3_tools.errors import UnknownNameError

# FORMAT.md section 1, V3-671B: name (within model.layers.N. unless top-level) -> (shape, dtype, scale shape or None)
V3_ATTN = {
    "input_layernorm.weight": ((7168,), "BF16", None),
    "post_attention_layernorm.weight": ((7168,), "BF16", None),
    "self_attn.q_a_proj.weight": ((1536, 7168), "F8_E4M3", (12, 56)),
    "self_attn.q_a_layernorm.weight": ((1536,), "BF16", None),
    "self_attn.q_b_proj.weight": ((24576, 1536), "F8_E4M3", (192, 12)),
    "self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), "F8_E4M3", (5, 56)),
    "self_attn.kv_a_layernorm.weight": ((512,), "BF16", None),
    "self_attn.kv_b_proj.weight": ((32768, 512), "F8_E4M3", (256, 4)),
    "self_attn.o_proj.weight": ((7168, 16384), "F8_E4M3", (56, 128)),
}
V3_DENSE = {
    "mlp.gate_proj.weight": ((18432, 7168), "F8_E4M3", (144, 56)),
    "mlp.up_proj.weight": ((18432, 7168), "F8_E4M3", (144, 56)),
    "mlp.down_proj.weight": ((7168, 18432), "F8_E4M3", (56, 144)),
}
V3_MOE = {
    "mlp.gate.weight": ((256, 7168), "BF16", None),
    "mlp.gate.e_score_correction_bias": ((256,), "F32", None),
    "mlp.shared_experts.gate_proj.weight": ((2048, 7168), "F8_E4M3", (16, 56)),
    "mlp.shared_experts.up_proj.weight": ((2048, 7168), "F8_E4M3", (16, 56)),
    "mlp.shared_experts.down_proj.weight": ((7168, 2048), "F8_E4M3", (56, 16)),
}
V3_EXPERT = {
    "gate_proj.weight": ((2048, 7168), "F8_E4M3", (16, 56)),
    "up_proj.weight": ((2048, 7168), "F8_E4M3", (16, 56)),
    "down_proj.weight": ((7168, 2048), "F8_E4M3", (56, 16)),
}
V3_TOP = {
    "model.embed_tokens.weight": ((129280, 7168), "BF16", None),
    "model.norm.weight": ((7168,), "BF16", None),
    "lm_head.weight": ((129280, 7168), "BF16", None),
}
V3_MTP_EXTRA = {
    "embed_tokens.weight": ((129280, 7168), "BF16", None),
    "enorm.weight": ((7168,), "BF16", None),
    "hnorm.weight": ((7168,), "BF16", None),
    "eh_proj.weight": ((7168, 14336), "BF16", None),
    "shared_head.norm.weight": ((7168,), "BF16", None),
    "shared_head.head.weight": ((129280, 7168), "BF16", None),
}


def _format_table_v3() -> dict[str, tuple]:
    want: dict[str, tuple] = dict(V3_TOP)
    for layer in range(62):
        rows = dict(V3_ATTN)
        rows.update(V3_DENSE if layer < 3 else V3_MOE)
        if layer >= 3:
            for e in range(256):
                rows.update({f"mlp.experts.{e}.{k}": v for k, v in V3_EXPERT.items()})
        if layer == 61:
            rows.update(V3_MTP_EXTRA)
        want.update({f"model.layers.{layer}.{k}": v for k, v in rows.items()})
    return want


def test_v3_671b_expected_set_matches_format_table() -> None:
    exp = N.expected_tensors(ModelConfig.builtin("deepseek-v3"))
    want = _format_table_v3()
    weights = {k: v for k, v in exp.items() if not k.endswith("_scale_inv")}
    assert set(weights) == set(want), sorted(set(weights) ^ set(want))[:10]
    for name, (shape, dtype, sshape) in want.items():
        spec = exp[name]
        assert spec.shape == shape and spec.dtype == dtype, (name, spec)
        if sshape is None:
            assert spec.scale is None and name + "_scale_inv" not in exp, name
        else:
            s = exp[name + "_scale_inv"]
            assert (s.shape, s.dtype) == (sshape, "F32"), (name, s)
    # eh_proj's dtype is unconfirmed: FP8 is accepted as an alternative
    assert "F8_E4M3" in exp["model.layers.61.eh_proj.weight"].alt_dtypes
    # DeepSeek's published sizes: 671B in the main model, about 14B in the MTP module.
    main = sum(_numel(s.shape) for k, s in exp.items() if not k.endswith("_scale_inv") and ".layers.61." not in k)
    mtp = sum(_numel(s.shape) for k, s in exp.items() if not k.endswith("_scale_inv") and ".layers.61." in k)
    assert abs(main / 671e9 - 1) < 0.005, main
    assert abs(mtp / 14e9 - 1) < 0.1, mtp


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_mtp_can_be_left_out() -> None:
    cfg = ModelConfig.builtin("deepseek-v3")
    assert not any(".layers.61." in k for k in N.expected_tensors(cfg, mtp=False))


@pytest.mark.parametrize(
    "hf, mp, split",
    [
        ("model.embed_tokens.weight", "embed.weight", 0),
        ("lm_head.weight", "head.weight", 0),
        ("model.norm.weight", "norm.weight", None),
        ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight", None),
        ("model.layers.5.post_attention_layernorm.weight", "layers.5.ffn_norm.weight", None),
        ("model.layers.5.self_attn.q_a_proj.weight_scale_inv", "layers.5.attn.wq_a.scale", None),
        ("model.layers.5.self_attn.q_b_proj.weight", "layers.5.attn.wq_b.weight", 0),
        ("model.layers.5.self_attn.kv_a_proj_with_mqa.weight", "layers.5.attn.wkv_a.weight", None),
        ("model.layers.5.self_attn.kv_a_layernorm.weight", "layers.5.attn.kv_norm.weight", None),
        ("model.layers.5.self_attn.kv_b_proj.weight", "layers.5.attn.wkv_b.weight", 0),
        ("model.layers.5.self_attn.o_proj.weight_scale_inv", "layers.5.attn.wo.scale", 1),
        ("model.layers.1.mlp.gate_proj.weight", "layers.1.ffn.w1.weight", 0),
        ("model.layers.1.mlp.up_proj.weight", "layers.1.ffn.w3.weight", 0),
        ("model.layers.1.mlp.down_proj.weight", "layers.1.ffn.w2.weight", 1),
        ("model.layers.9.mlp.gate.weight", "layers.9.ffn.gate.weight", None),
        ("model.layers.9.mlp.gate.e_score_correction_bias", "layers.9.ffn.gate.bias", None),
        ("model.layers.9.mlp.experts.17.down_proj.weight", "layers.9.ffn.experts.17.w2.weight", N.EXPERT),
        ("model.layers.9.mlp.shared_experts.up_proj.weight", "layers.9.ffn.shared_experts.w3.weight", 0),
        ("model.layers.9.self_attn.q_proj.weight", "layers.9.attn.wq.weight", 0),
    ],
)
def test_names_round_trip_with_split_dims(hf: str, mp: str, split) -> None:
    n = N.parse_hf(hf)
    assert n.mp == mp and n.split == split
    assert N.mp_to_hf(mp) == hf
    assert N.parse_mp(mp).hf == hf


@pytest.mark.parametrize(
    "bad",
    [
        "model.layers.3.mlp.experts.2.gate.weight",
        "model.layers.x.input_layernorm.weight",
        "model.embed_tokens.weight_scale_inv",
        "model.layers.3.self_attn.rotary_emb.inv_freq",
        "transformer.h.0.attn.weight",
    ],
)
def test_unknown_names_fail_closed_naming_the_tensor(bad: str) -> None:
    with pytest.raises(UnknownNameError) as e:
        N.parse_hf(bad)
    assert bad in str(e.value)


def test_mp_expected_set_partitions_experts_and_splits() -> None:
    cfg = ModelConfig.builtin("deepseek-v3")
    r1 = N.expected_mp_tensors(cfg, 1, 8)
    assert "layers.3.ffn.experts.32.w1.weight" in r1 and "layers.3.ffn.experts.31.w1.weight" not in r1
    assert r1["layers.0.attn.wq_b.weight"].shape == (24576 // 8, 1536)
    assert r1["layers.0.attn.wq_b.scale"].shape == (192 // 8, 12)
    assert r1["layers.0.attn.wo.weight"].shape == (7168, 16384 // 8)
    assert r1["embed.weight"].shape == (129280 // 8, 7168)
    assert r1["layers.3.ffn.gate.bias"].dtype == "F32"
    assert not any(k.startswith("layers.61.") for k in r1)


def test_v32_indexer_tensors_and_v2_lite_q_proj() -> None:
    v32 = N.expected_tensors(ModelConfig.builtin("deepseek-v3.2"))
    assert v32["model.layers.0.self_attn.indexer.wq_b.weight"].shape == (64 * 128, 1536)
    assert v32["model.layers.0.self_attn.indexer.wk.weight_scale_inv"].shape == (1, 56)
    assert v32["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == "BF16"
    lite = N.expected_tensors(ModelConfig.builtin("deepseek-v2-lite"))
    assert lite["model.layers.0.self_attn.q_proj.weight"].shape == (16 * 192, 2048)
    assert not any("q_a_proj" in k or "e_score_correction_bias" in k for k in lite)
    assert all(s.dtype != "F8_E4M3" for s in lite.values())
