"""ModelConfig: every built-in geometry parses; both rope schemas; unknown and contradictory fields fail clearly."""

from __future__ import annotations

import json
import math

import pytest

from dsv3_tools.config import FAMILY_TYPES, ModelConfig, builtin_config_path, builtin_names
from dsv3_tools.errors import ConfigError


def test_builtins_parse_and_round_trip() -> None:
    names = builtin_names()
    assert {"tiny", "deepseek-v3", "deepseek-v3.1", "deepseek-v2-lite", "deepseek-v2", "kimi-k2"} <= set(names)
    for n in names:
        if json.loads(builtin_config_path(n).read_text())["model_type"] not in FAMILY_TYPES:
            continue  # DeepSeek-V4 geometries have their own config class (tests/test_v4_names.py)
        cfg = ModelConfig.builtin(n)
        again = ModelConfig.from_dict(cfg.to_hf_dict())
        assert again == cfg, n


def test_v3_derived_values() -> None:
    c = ModelConfig.builtin("deepseek-v3")
    assert c.dense_layers == [0, 1, 2]
    assert c.moe_layers[0] == 3 and c.moe_layers[-1] == 60
    assert list(c.mtp_layers) == [61]
    assert c.qk_head_dim == 192
    assert c.scale_grid((576, 7168)) == (5, 56)
    assert c.scale_grid((24576, 1536)) == (192, 12)
    assert c.block_size == (128, 128)
    assert c.has_router_bias and c.has_q_lora and c.is_fp8
    # softmax scale 192**-0.5 times mscale**2, mscale = 0.1 * 1 * ln(40) + 1
    m = 0.1 * math.log(40) + 1
    assert c.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert ModelConfig.builtin("deepseek-v3.1").quant.scale_fmt == "ue8m0"
    assert ModelConfig.builtin("deepseek-v2-lite").q_lora_rank is None
    assert ModelConfig.builtin("kimi-k2").num_nextn_predict_layers == 0


def test_tiny_exercises_what_the_issue_asks() -> None:
    c = ModelConfig.builtin("tiny")
    assert len(c.dense_layers) >= 1 and len(c.moe_layers) >= 2 and len(c.mtp_layers) == 1
    assert c.n_routed_experts >= 8 and c.n_group > 1 and c.topk_group < c.n_group
    assert c.has_q_lora and c.has_router_bias and c.scoring_func == "sigmoid"
    kv_a_rows = c.kv_lora_rank + c.qk_rope_head_dim
    assert kv_a_rows % 128 != 0  # ragged like V3's 576
    assert c.hidden_size % 128 != 0 and c.hidden_size > 128  # crosses a block boundary
    assert c.rope_scaling is not None and c.rope_scaling.factor > 1


def _v3() -> dict:
    return json.loads(builtin_config_path("deepseek-v3").read_text())


def test_transformers5_rope_parameters_schema() -> None:
    d = _v3()
    rs = d.pop("rope_scaling")
    theta = d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, **{k: v for k, v in rs.items() if k != "type"}}
    assert ModelConfig.from_dict(d) == ModelConfig.builtin("deepseek-v3")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(new_thing=1), "unknown field(s): new_thing"),
        (lambda d: d.update(topk_group=9), "topk_group 9 exceeds n_group 8"),
        (lambda d: d.update(n_group=7), "not divisible by n_group"),
        (lambda d: d.update(model_type="llama"), "not a DeepSeek-V3-family type"),
        (lambda d: d.pop("hidden_size"), "missing field(s): hidden_size"),
        (lambda d: d["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
        (lambda d: d["quantization_config"].update(scale_fmt="e5m2"), "unsupported scale_fmt"),
        (lambda d: d.update(scoring_func="softmax"), "noaux_tc' requires scoring_func 'sigmoid'"),
        (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 5.0, "factor": 40}), "contradicts"),
        (lambda d: d.update(hidden_size="7168"), "hidden_size must be an integer"),
    ],
)
def test_bad_configs_are_refused_clearly(mutate, message: str) -> None:
    d = _v3()
    mutate(d)
    with pytest.raises(ConfigError, match=None) as e:
        ModelConfig.from_dict(d)
    assert message in str(e.value)


def test_config_file_errors(tmp_path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(p)
    with pytest.raises(ConfigError, match="unknown built-in config"):
        ModelConfig.load("no-such-model")
