"""Synthetic tokenizer files look like each family's real ones and load in transformers without remote code.

The chat templates are compared with independent copies of the real ones (``tests/data``, see its README): the
synthetic folder's ``apply_chat_template`` must render exactly what the real template text renders for the same
messages. Kimi-K2 and V3.2 use their real geometry at one layer; only ``config.json`` and the tokenizer files are
written for them here (with the functions ``synth`` calls; synth itself is checked on the tiny model), since a
tokenizer does not read weights and Kimi-K2 at one layer is 5 GB of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3_tools.config import ModelConfig
from dsv3_tools.synth import derive_config
from dsv3_tools.tokenizer_files import write_tokenizer_files
from dsv3_tools.writer import write_json_atomic

DATA = Path(__file__).parent / "data"
REAL_V3 = (DATA / "deepseek-v3.chat_template.jinja").read_text(encoding="utf-8")
REAL_KIMI = (DATA / "kimi-k2.chat_template.jinja").read_text(encoding="utf-8")

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour ! 深度求索"},
        {"role": "user", "content": "And now?\nTwo lines."},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ],
]


def _family(tmp: Path, name: str) -> tuple[Path, ModelConfig, dict[str, int]]:
    cfg = derive_config(ModelConfig.load(name), dtype="bf16", layers=1, experts=8)
    out = tmp / name
    out.mkdir()
    write_json_atomic(out / "config.json", cfg.to_hf_dict())
    return out, cfg, write_tokenizer_files(out, cfg)


def _auto(path: Path, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kw)


@pytest.mark.parametrize("gen", [True, False])
def test_tiny_v3_template_renders_as_the_real_one(tiny_fp8: Path, gen: bool) -> None:
    tok = _auto(tiny_fp8)
    assert json.loads((tiny_fp8 / "tokenizer_config.json").read_text())["chat_template"] == REAL_V3
    for i, msgs in enumerate(CONVERSATIONS):
        ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        real = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=REAL_V3)
        assert ours == real, f"conversation {i}"
        assert ours.startswith("<｜begin▁of▁sentence｜>") and ("<｜User｜>" in ours)
        assert ours.endswith("<｜Assistant｜>") == gen, f"conversation {i}"
    # The markers are single special tokens with ids inside the vocabulary.
    ids = tok.apply_chat_template(CONVERSATIONS[1], tokenize=True, add_generation_prompt=True)["input_ids"]
    cfg = ModelConfig.load(tiny_fp8)
    user, assistant = tok.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"])
    assert ids[0] == tok.bos_token_id == cfg.bos_token_id == 0 and tok.eos_token_id == cfg.eos_token_id == 1
    assert user in ids and ids[-1] == assistant and max(ids) < cfg.vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == "Be brief.What is 2 + 2?"


def test_tiny_tokenizer_config_and_generation_config(tiny_fp8: Path) -> None:
    tc = json.loads((tiny_fp8 / "tokenizer_config.json").read_text())
    assert (
        tc["tokenizer_class"] == "LlamaTokenizerFast" and tc["add_bos_token"] is True and tc["add_eos_token"] is False
    )
    assert (
        tc["bos_token"]["content"] == "<｜begin▁of▁sentence｜>"
        and tc["eos_token"]["content"] == "<｜end▁of▁sentence｜>"
    )
    assert tc["legacy"] is True and tc["model_max_length"] == 131072
    gc = json.loads((tiny_fp8 / "generation_config.json").read_text())
    assert gc == {
        "_from_model_config": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "4.46.3",
    }
    tj = json.loads((tiny_fp8 / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    assert all(t["special"] for t in tj["added_tokens"]) and max(added.values()) < 512
    for marker in ("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁outputs▁end｜>"):
        assert marker in added and tj["model"]["vocab"][marker] == added[marker], marker


def test_kimi_k2_template_and_ids(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path, cfg, ids = _family(tmp_path, "kimi-k2")
    assert cfg.model_type == "kimi_k2" and cfg.num_hidden_layers == 1 and cfg.vocab_size == 163840
    # transformers has no kimi_k2 config class (the real checkpoint brings its own as remote code), so the
    # model config is named here; the tokenizer files need no remote code.
    tok = _auto(path, config=AutoConfig.for_model("deepseek_v3"))
    assert (tok.bos_token, tok.bos_token_id, cfg.bos_token_id) == ("[BOS]", 163584, 163584)
    assert (tok.eos_token, tok.eos_token_id, cfg.eos_token_id) == ("[EOS]", 163585, 163585)
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>"]) == [
        163586,
        163587,
        163588,
        163601,
    ]
    for i, msgs in enumerate(CONVERSATIONS[:3]):
        ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=REAL_KIMI
        ), f"conversation {i}"
        assert ours.endswith("<|im_assistant|>assistant<|im_middle|>")
    gc = json.loads((path / "generation_config.json").read_text())
    assert gc == {"max_length": 131072, "eos_token_id": ids["<|im_end|>"]} and gc["eos_token_id"] == 163586
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tc


def test_v32_has_no_template_and_that_is_detectable(tmp_path: Path) -> None:
    path, cfg, ids = _family(tmp_path, "deepseek-v3.2")
    assert cfg.model_type == "deepseek_v32" and cfg.has_indexer
    tok = _auto(path)
    assert tok.chat_template is None
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match="chat_template is not set"):
        tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    # The special tokens V3.2's own encoder writes are still there, inside the vocabulary.
    assert tok.convert_tokens_to_ids("<｜User｜>") == ids["<｜User｜>"] < cfg.vocab_size
    assert tok("hi").input_ids[0] == tok.bos_token_id == 0


def test_v2_chat_template(tmp_path: Path) -> None:
    path, _, _ = _family(tmp_path, "deepseek-v2-lite")
    s = _auto(path).apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert s == "<｜begin▁of▁sentence｜>Be brief.\n\nUser: What is 2 + 2?\n\nAssistant:"
