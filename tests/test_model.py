"""The model on the tiny config: against transformers, FP8 == its BF16 version, streaming == resident, the FP8 path.

The oracle is transformers' ``DeepseekV3ForCausalLM`` in float32, loaded from a BF16 copy of the FP8 fixture made
here by plain dequantization (``bf16(f32(w) * s)`` written out in this file). The tiny config has YaRN (factor 40),
q_lora, 4 expert groups with the router bias, shared experts, a dense layer, and dims not multiples of 128.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.errors import ConfigError
from dsv3_tools.model import load_model, run_model
from dsv3_tools.synth import synth

PROMPTS = [[3], [1, 17, 400, 5, 99, 250, 7], list(range(100, 119)), [int(t) for t in torch.arange(33) * 13 % 512]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_each_equal(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    """Bit-identical, per prompt (the lists are the same length)."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what} {i}: max |diff| {(a.float() - b.float()).abs().max().item()}"


def _dequant_copy(src: Path, dst: Path) -> None:
    """A BF16 HF folder with the same effective weights: plain block dequantization, config without quantization."""
    ck = open_checkpoint(src)
    out = {}
    for name in ck.tensors:
        if name.endswith("_scale_inv"):
            continue
        t = ck.read(name)
        if t.dtype == torch.float8_e4m3fn:
            s = ck.read(name + "_scale_inv")
            full = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            t = (t.float() * full).to(torch.bfloat16)
        out[name] = t.contiguous()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_bf16_of_fp8(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("model") / "bf16-of-fp8"
    _dequant_copy(tiny_fp8, p)
    return p


@pytest.fixture(scope="module")
def fp8_logits(tiny_fp8: Path):
    """Streamed run of the FP8 fixture (gemm bf16), with MTP and every layer's hidden state."""
    hidden: dict[int, list[torch.Tensor]] = {}
    out = run_model(open_checkpoint(tiny_fp8), PROMPTS, mtp=True, on_layer=lambda L, h: hidden.setdefault(L, h))
    return out, hidden


def test_matches_transformers(tiny_bf16_of_fp8: Path, fp8_logits) -> None:
    from transformers import DeepseekV3ForCausalLM

    cfg = ModelConfig.load(tiny_bf16_of_fp8)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor > 1 and cfg.has_router_bias and cfg.n_group > 1
    hf = DeepseekV3ForCausalLM.from_pretrained(tiny_bf16_of_fp8, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    ours = run_model(open_checkpoint(tiny_bf16_of_fp8), PROMPTS).logits
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            want = hf(torch.tensor([p])).logits[0].float()
            assert ours[i].shape == want.shape == (len(p), cfg.vocab_size)
            err = _rel(ours[i], want)
            assert err <= 1e-4, f"prompt {i} (length {len(p)}): relative Frobenius error {err:.2e} vs transformers"
            # Not only in aggregate: every position.
            worst = max(range(len(p)), key=lambda t: _rel(ours[i][t], want[t]))
            assert _rel(ours[i][worst], want[worst]) <= 1e-3, f"prompt {i} position {worst}"


def test_fp8_with_bf16_gemm_equals_its_bf16_version(tiny_bf16_of_fp8: Path, fp8_logits) -> None:
    out, _ = fp8_logits
    bf16 = run_model(open_checkpoint(tiny_bf16_of_fp8), PROMPTS, stream=False, mtp=True)
    _assert_each_equal(out.logits, bf16.logits, "prompt")
    _assert_each_equal(out.mtp_logits, bf16.mtp_logits, "MTP prompt")


def test_streaming_equals_resident(tiny_fp8: Path, fp8_logits) -> None:
    out, hidden = fp8_logits
    seen: dict[int, list[torch.Tensor]] = {}
    res = run_model(
        open_checkpoint(tiny_fp8), PROMPTS, stream=False, mtp=True, on_layer=lambda L, h: seen.setdefault(L, h)
    )
    assert sorted(seen) == sorted(hidden) == [0, 1, 2]
    for L in seen:
        _assert_each_equal(seen[L], hidden[L], f"layer {L} prompt")
    _assert_each_equal(res.logits, out.logits, "prompt")
    _assert_each_equal(res.mtp_logits, out.mtp_logits, "MTP prompt")


def test_outputs_shapes_and_hidden_states(tiny_fp8: Path, fp8_logits) -> None:
    out, hidden = fp8_logits
    cfg = ModelConfig.load(tiny_fp8)
    assert [t.shape for t in out.logits] == [(len(p), cfg.vocab_size) for p in PROMPTS]
    assert [t.shape for t in out.mtp_logits] == [(len(p) - 1, cfg.vocab_size) for p in PROMPTS]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in out.logits)
    assert all(torch.isfinite(t).all() for t in out.logits + out.mtp_logits)
    # The logits are the final norm and head of the last hidden state (computed here by hand).
    ck = open_checkpoint(tiny_fp8)
    norm, head = ck.read("model.norm.weight").float(), ck.read("lm_head.weight").float()
    for i, h in enumerate(hidden[cfg.num_hidden_layers - 1]):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * norm
        assert _rel(out.logits[i], x @ head.T) < 1e-5, f"prompt {i}"
    # A prompt's logits do not depend on the other prompts of the batch (attention stays inside a prompt).
    alone = run_model(ck, [PROMPTS[2]]).logits[0]
    assert _rel(alone, out.logits[2]) < 1e-5


def test_fp8_gemm_path_within_activation_quantization(tiny_fp8: Path, tiny_fp8_ue8m0: Path, fp8_logits) -> None:
    out, hidden = fp8_logits
    h8: dict[int, list[torch.Tensor]] = {}
    fp8 = run_model(open_checkpoint(tiny_fp8), PROMPTS, gemm="fp8", on_layer=lambda L, h: h8.setdefault(L, h))
    # Layer 0 (dense, before any routing decision can flip): the error of a few chained FP8 products.
    err0 = _rel(torch.cat(h8[0]), torch.cat(hidden[0]))
    assert 5e-3 < err0 < 0.1, err0
    assert all(torch.isfinite(t).all() for t in fp8.logits)
    # The ue8m0 checkpoint runs the same way (power-of-two activation scales).
    ck = open_checkpoint(tiny_fp8_ue8m0)
    a = run_model(ck, PROMPTS[1:2], gemm="fp8", on_layer=lambda L, h: h8.__setitem__(("u", L), h)).logits[0]
    b = run_model(ck, PROMPTS[1:2], gemm="bf16", on_layer=lambda L, h: h8.__setitem__(("b", L), h)).logits[0]
    assert 5e-3 < _rel(torch.cat(h8[("u", 0)]), torch.cat(h8[("b", 0)])) < 0.1
    assert torch.isfinite(a).all() and a.shape == b.shape


def test_mp_shards_reassembled_in_one_process(tiny_fp8: Path, fp8_logits, tmp_path: Path) -> None:
    from test_model_tp import make_mp

    out, _ = fp8_logits
    make_mp(tiny_fp8, tmp_path / "mp2", 2)
    ck = open_checkpoint(tmp_path / "mp2")
    assert ck.layout == "mp" and ck.world == 2
    got = run_model(ck, PROMPTS).logits
    _assert_each_equal(got, out.logits, "prompt")


def test_bad_inputs(tiny_fp8: Path) -> None:
    ck = open_checkpoint(tiny_fp8)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        run_model(ck, [[1, 512]])
    with pytest.raises(ConfigError, match="empty"):
        run_model(ck, [[1], []])
    with pytest.raises(ConfigError, match="engine"):
        run_model(ck, [[1]], engine="tensorrt")
    with pytest.raises(ConfigError, match="gemm"):
        run_model(ck, [[1]], gemm="int8")


def test_v2_style_router_and_plain_q_proj(tmp_path: Path) -> None:
    """V2-Lite's shape of the family: no q_lora, softmax router without bias, group-limited greedy; BF16."""
    from transformers import DeepseekV2ForCausalLM

    base = ModelConfig.load("tiny")
    d = base.to_hf_dict()
    d.update(
        model_type="deepseek_v2",
        q_lora_rank=None,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
        architectures=["DeepseekV2ForCausalLM"],
    )
    d.pop("quantization_config", None)
    cfg = ModelConfig.from_dict(d)
    synth(tmp_path / "v2", replace(cfg), dtype="bf16", seed=3, shards=1)
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "v2", dtype=torch.float32).eval()
    ours = run_model(open_checkpoint(tmp_path / "v2"), PROMPTS[1:3]).logits
    with torch.no_grad():
        for i, p in enumerate(PROMPTS[1:3]):
            err = _rel(ours[i], hf(torch.tensor([p])).logits[0])
            assert err <= 1e-4, f"prompt {i}: {err:.2e} vs transformers' DeepseekV2"
    shutil.rmtree(tmp_path / "v2")


def test_load_model_reuses_weights(tiny_fp8: Path, fp8_logits) -> None:
    out, _ = fp8_logits
    m = load_model(open_checkpoint(tiny_fp8))
    a = m.forward(PROMPTS[:2]).logits
    b = m.forward(PROMPTS[:2]).logits
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Another batch composition changes the matmul blocking, so only rounding-level agreement with the 4-prompt run.
    assert all(_rel(x, z) < 1e-5 for x, z in zip(a, out.logits[:2]))


def test_streaming_holds_one_layer_at_a_time(tiny_fp8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from dsv3_tools import model as M

    alive: weakref.WeakSet = weakref.WeakSet()
    held: list[int] = []  # layers still alive when the next one is read
    init = M.Layer.__init__

    def counting_init(self, env, L):
        held.append(len(alive))
        init(self, env, L)
        alive.add(self)

    monkeypatch.setattr(M.Layer, "__init__", counting_init)
    ck = open_checkpoint(tiny_fp8)
    run_model(ck, PROMPTS[:2], stream=True)
    assert held == [0, 0, 0]
    held.clear()
    run_model(ck, PROMPTS[:2], stream=False)  # the check sees a resident model holding its layers
    assert held == [0, 1, 2]


def test_teacher_forcing_on_own_inputs_reproduces_each_layer(tiny_fp8: Path, fp8_logits) -> None:
    """A layer run on this run's own input of it (teacher forcing) gives this run's output of it bit for bit, in
    the forward's hook (streamed: the loaded layer) and through ``run_layer`` (resident); the MTP module run on
    the final hidden states gives the MTP logits."""
    out, hidden = fp8_logits
    ck = open_checkpoint(tiny_fp8)
    embed = ck.read("model.embed_tokens.weight").float()
    inputs = {0: [embed[torch.tensor(p)] for p in PROMPTS]} | {L + 1: hidden[L] for L in hidden}
    forced: dict[int, list[torch.Tensor]] = {}
    again = run_model(ck, PROMPTS, mtp=True, teacher=lambda L, run: forced.setdefault(L, run(inputs[L])))
    assert sorted(forced) == [0, 1, 2, 3]  # the main layers, then the MTP layer
    for L in (0, 1, 2):
        _assert_each_equal(forced[L], hidden[L], f"layer {L} forced, prompt")
    _assert_each_equal(forced[3], out.mtp_logits, "MTP forced, prompt")
    _assert_each_equal(again.logits, out.logits, "prompt")  # the hook does not disturb the free run
    m = load_model(ck)
    for L in (0, 1, 2):
        _assert_each_equal(m.run_layer(L, PROMPTS, inputs[L]), hidden[L], f"run_layer {L}, prompt")
    # Another input gives another output (the layer is really applied to what it is given).
    other = m.run_layer(1, PROMPTS, [2 * x for x in inputs[1]])
    assert all(not torch.equal(a, b) for a, b in zip(other, hidden[1]))
    with pytest.raises(ConfigError, match="positions for prompts"):
        m.run_layer(1, PROMPTS, inputs[1][:2] + [inputs[1][2][:-1], inputs[1][3]])
    with pytest.raises(ConfigError, match="not a main layer"):
        m.run_layer(3, PROMPTS, inputs[1])
