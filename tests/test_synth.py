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


# ---------------------------------------------------------------------- the "trained" profile


def _profile_run(ck_path: Path) -> dict:
    """One run of the default prompts, recording what the conditioning tests measure: every layer's output, every
    router's input, each attention's probabilities; and the same prompts on the FP8 GEMM path."""
    from dsv3_tools import model as M
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.verify.prompts import DEFAULT_PROMPTS, tokenize

    ck = open_checkpoint(ck_path)
    ids = tokenize(ck_path, list(DEFAULT_PROMPTS))
    rec: dict = {"route": {}, "attn": [], "hidden": {}, "hidden8": {}}
    route, attention = M.Layer.route, M._causal_attention

    def spy_route(self, x):  # noqa: ANN001
        rec["route"].setdefault(self.L, x.float().clone())
        return route(self, x)

    def spy_attention(q, k, v, scale):  # noqa: ANN001
        s = torch.einsum("thd,shd->hts", q, k).float() * scale
        T = q.shape[0]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        rec["attn"].append(s.softmax(-1))
        return attention(q, k, v, scale)

    M.Layer.route, M._causal_attention = spy_route, spy_attention
    try:
        rec["bf16"] = M.run_model(ck, ids, on_layer=lambda L, h: rec["hidden"].__setitem__(L, torch.cat(h)))
    finally:
        M.Layer.route, M._causal_attention = route, attention
    rec["fp8"] = M.run_model(ck, ids, gemm="fp8", on_layer=lambda L, h: rec["hidden8"].__setitem__(L, torch.cat(h)))
    rec["embed"] = torch.cat([ck.read("model.embed_tokens.weight").float()[torch.tensor(r)] for r in ids])
    return rec


def _cos_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.fixture(scope="module")
def profiles(tiny_fp8: Path, tiny_trained_fp8: Path) -> dict:
    return {"trained": _profile_run(tiny_trained_fp8), "random": _profile_run(tiny_fp8)}


def test_trained_profile_same_seed_same_bytes(tiny_trained_fp8: Path, tmp_path: Path) -> None:
    synth(tmp_path / "a", "tiny", seed=0, shards=4, profile="trained")
    assert folder_digest(tmp_path / "a") == folder_digest(tiny_trained_fp8)
    with pytest.raises(Exception, match="--profile must be one of random, trained"):
        synth(tmp_path / "b", "tiny", profile="pretrained")


def test_trained_profile_fp8_gemm_agrees_everywhere(profiles: dict) -> None:
    """The issue's bar: BF16-GEMM vs FP8-GEMM logits at cosine >= 0.999 at every position, and every layer's hidden
    state too; the random profile misses it (its router and large branches amplify the same rounding)."""
    for name, rec in profiles.items():
        logits = _cos_min(torch.cat(rec["bf16"].logits), torch.cat(rec["fp8"].logits))
        layers = [_cos_min(rec["hidden"][L], rec["hidden8"][L]) for L in sorted(rec["hidden"])]
        if name == "trained":
            assert logits >= 0.999, f"trained: logits cos min {logits:.6f} < 0.999"
            assert min(layers) >= 0.999, f"trained: hidden-state cos min per layer {layers}"
        else:
            assert logits < 0.99, f"random: logits cos min {logits:.6f} (expected chaotic, < 0.99)"


def test_trained_profile_properties(profiles: dict, tiny_trained_fp8: Path, tiny_fp8: Path) -> None:
    """Small residual updates, norms near 1, router margins between chosen and unchosen experts and groups, and
    attention that does not saturate; measured here from the tensors (safetensors) and the recorded activations,
    against the random profile, which has none of them."""
    cfg = ModelConfig.load(tiny_trained_fp8)
    k, G, tg = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    for name, path in (("trained", tiny_trained_fp8), ("random", tiny_fp8)):
        rec, t = profiles[name], _all_tensors(path)
        # Each layer's update (output - input) against the residual stream it is added to.
        prev, ratios = rec["embed"], []
        for L in sorted(rec["hidden"]):
            h = rec["hidden"][L]
            ratios.append(float(((h - prev).norm(dim=-1) / prev.norm(dim=-1)).median()))
            prev = h
        norms = [v.float() for n, v in t.items() if n.endswith("layernorm.weight") or n.endswith("norm.weight")]
        spread = max(float((v - 1).abs().max()) for v in norms)
        # Router: sigmoid scores plus the bias, sorted; the k-th against the (k+1)-th, and the same for groups.
        margins, group_margins = [], []
        for L, x in rec["route"].items():
            w = t[f"model.layers.{L}.mlp.gate.weight"].float()
            s = torch.sigmoid(x @ w.T) + t[f"model.layers.{L}.mlp.gate.e_score_correction_bias"]
            top = s.sort(-1, descending=True).values
            margins.append(float((top[:, k - 1] - top[:, k]).min()))
            gs = s.view(-1, G, s.shape[1] // G).topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
            group_margins.append(float((gs[:, tg - 1] - gs[:, tg]).min()))
        # Attention: the mean over positions >= 64 of the largest probability (1 = saturated on one token).
        peak = max(float(p[:, 64:].amax(-1).mean()) for p in rec["attn"] if p.shape[-1] > 64)
        if name == "trained":
            assert max(ratios) < 0.35, f"trained: median update / residual per layer {ratios}"
            assert spread < 0.1, f"trained: a norm weight is {spread:.3f} from 1"
            assert min(margins) > 0.1 and min(group_margins) > 0.1, (margins, group_margins)
            assert peak < 0.2, f"trained: mean peak attention probability {peak:.3f}"
        else:
            assert min(ratios) > 0.5 and spread > 0.2, (ratios, spread)
            assert min(margins) < 0.01, margins
            assert peak > 0.2, peak
