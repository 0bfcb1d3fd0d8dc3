"""generate's text side: the chat template rendered by jinja2 equals transformers' ``apply_chat_template`` for the
real DeepSeek-V3 (and Kimi-K2) template text kept in tests/data, incremental decoding never splits a character,
stop strings are never shown, and the tokenizer files' problems are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_tokenizer_files import CONVERSATIONS, REAL_KIMI, REAL_V3

from dsv3_tools.config import ModelConfig
from dsv3_tools.errors import Dsv3Error
from dsv3_tools.generate.chat import ChatTemplate, IncrementalText, StopText, Tokenizer
from dsv3_tools.synth import derive_config
from dsv3_tools.tokenizer_files import write_tokenizer_files


def _hf(path: Path, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kw)


@pytest.mark.parametrize("gen", [True, False])
def test_real_v3_template_renders_as_transformers_does(tiny_fp8: Path, gen: bool) -> None:
    hf = _hf(tiny_fp8)
    ours = ChatTemplate(REAL_V3, {"bos_token": hf.bos_token, "eos_token": hf.eos_token})
    for i, msgs in enumerate(CONVERSATIONS):
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=REAL_V3)
        assert ours.render(msgs, add_generation_prompt=gen) == want, f"conversation {i}"


def test_prompt_ids_equal_transformers(tiny_fp8: Path) -> None:
    hf, tok = _hf(tiny_fp8), Tokenizer.load(tiny_fp8)
    assert tok.template is not None and tok.template.text == REAL_V3
    for i, msgs in enumerate(CONVERSATIONS):
        want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.chat_ids(msgs) == want, f"conversation {i}"
    assert tok.raw_ids("hello world") == hf("hello world").input_ids  # BOS added once, by the tokenizer
    assert tok.eos_ids == {1}


def test_kimi_template_and_stop_ids(tmp_path: Path) -> None:
    from transformers import AutoConfig

    cfg = derive_config(ModelConfig.load("kimi-k2"), dtype="bf16", layers=1, experts=8)
    write_tokenizer_files(tmp_path, cfg)
    hf = _hf(tmp_path, config=AutoConfig.for_model("deepseek_v3"))
    tok = Tokenizer.load(tmp_path)
    for i, msgs in enumerate(CONVERSATIONS[:3]):
        want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, chat_template=REAL_KIMI)
        assert tok.chat_ids(msgs) == want["input_ids"], f"conversation {i}"
    # An answer ends at <|im_end|> (generation_config.json) or at [EOS] (the tokenizer's).
    assert tok.eos_ids == {163586, 163585}


def test_incremental_text_never_splits_a_character(tiny_fp8: Path) -> None:
    tok = Tokenizer.load(tiny_fp8)
    text = "深度求索 (DeepSeek) ünïcödé 🙂 the quick brown fox"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) // 2  # mostly single bytes: characters span several tokens
    inc = IncrementalText(tok)
    pieces = [inc.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + inc.flush() == text == inc.text
    # The first character's three bytes: nothing, nothing, then the character.
    assert pieces[:3] == ["", "", "深"]


def test_incremental_text_with_special_tokens_and_a_partial_tail(tiny_fp8: Path) -> None:
    tok = Tokenizer.load(tiny_fp8)
    inc = IncrementalText(tok)
    ids = tok.encode("ab", add_special_tokens=True) + tok.encode("深", add_special_tokens=False)[:2]
    assert "".join(inc.add(t) for t in ids) == "ab"  # BOS skipped; the unfinished character held back
    assert inc.flush() == "\ufffd"  # what is left at the end shows as a replacement character


def test_stop_strings_are_never_shown() -> None:
    s = StopText(("o w",))
    assert s.feed("Hel") == "Hel"
    assert s.feed("lo wo") == "l" and s.hit and s.text == "Hell"
    s = StopText(("END", "STOP"))
    assert s.feed("abcE") == "abc"  # "E" may start "END": held back
    assert s.feed("N") == ""
    assert s.feed("x S") == "ENx " and not s.hit  # "S" may start "STOP"
    assert s.feed("TO") == ""
    assert s.feed("P!") == "" and s.hit and s.text == "abcENx "
    s = StopText(("zz",))
    assert s.feed("az") == "a" and s.finish() == "z" and s.text == "az"


def test_tokenizer_problems_are_one_line_errors(tiny_fp8: Path, tmp_path: Path) -> None:
    with pytest.raises(Dsv3Error, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tiktoken.model").write_text("x")
    with pytest.raises(Dsv3Error, match="tiktoken tokenizer, as Kimi-K2 ships, is not supported"):
        Tokenizer.load(tmp_path)
    no_tpl = tmp_path / "v32-like"
    no_tpl.mkdir()
    for f in ("tokenizer.json", "generation_config.json"):
        shutil.copy(tiny_fp8 / f, no_tpl / f)
    tc = json.loads((tiny_fp8 / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = Tokenizer.load(no_tpl)
    assert tok.template is None
    with pytest.raises(Dsv3Error, match="has no chat template .* pass --raw"):
        tok.chat_ids(CONVERSATIONS[0])
    assert tok.raw_ids("hi")[0] == 0
    with pytest.raises(Dsv3Error, match="does not compile"):
        ChatTemplate("{% if %}", {})
    with pytest.raises(Dsv3Error, match="refused the conversation: no system"):
        ChatTemplate("{{ raise_exception('no system') }}", {}).render([])
