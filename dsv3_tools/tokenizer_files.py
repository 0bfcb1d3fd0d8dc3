"""The tokenizer files of a synthetic checkpoint, arranged the way each family really ships them.

Every family gets a small byte-level BPE ``tokenizer.json`` (loadable by ``tokenizers`` and by transformers'
``AutoTokenizer`` without remote code) that holds the special tokens its chat template uses, as added special
tokens with ids inside ``vocab_size``, plus ``tokenizer_config.json`` and ``generation_config.json``:

- DeepSeek-V3 (``deepseek_v3``, also V3.1's config): ``LlamaTokenizerFast``, BOS ``<｜begin▁of▁sentence｜>`` (id 0)
  added at the start, EOS ``<｜end▁of▁sentence｜>`` (id 1), and the real V3 chat template (``<｜User｜>`` /
  ``<｜Assistant｜>`` turns, system prompts joined at the start, tool calls); ``generation_config.json`` with the
  real keys and values (``do_sample``, temperature 0.6, top-p 0.95).
- DeepSeek-V3.2 (``deepseek_v32``): the same tokenizer and special tokens, but **no chat template**: the real
  checkpoint ships its prompt encoder as Python (``encoding/encoding_dsv32.py``), which is not reproduced here.
- Kimi-K2 (``kimi_k2``): the real checkpoint ships a tiktoken model (``tiktoken.model``) read by remote code
  (``tokenization_kimi.py``, ``auto_map``) that needs ``trust_remote_code``. Here the same special tokens at
  their real ids (``[BOS]`` 163584, ``[EOS]`` 163585, ``<|im_end|>`` 163586, ...) sit in a byte-level BPE
  ``tokenizer.json`` loaded as ``PreTrainedTokenizerFast``, with Kimi-K2's own chat template and its
  ``generation_config.json`` (EOS ``<|im_end|>``, the end of an assistant turn).
- DeepSeek-V2 (``deepseek_v2``): the V3 tokenizer with DeepSeek-V2-Chat's template (``User: ... Assistant:``).
- DeepSeek-V4 (``deepseek_v4``): ``PreTrainedTokenizerFast``, BOS not added by the tokenizer, **no chat template**
  (the release ships its prompt encoder as Python, ``encoding/encoding_dsv4.py``, not reproduced here), its
  ``generation_config.json`` (sampling at temperature 1.0, top-p 1.0).

The template texts are package data (``chat_templates/*.jinja``). The special tokens of the DeepSeek families are
placed at the top of the vocabulary (their real ids are not reproduced); the ordinary vocabulary (bytes, a few
merges) keeps the ids it always had, so text tokenizes as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig
from .errors import ConfigError
from .writer import write_json_atomic

if TYPE_CHECKING:
    from .v4.config import V4Config

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# The markers DeepSeek-V3's chat template writes (turns and tool calls), in the order they get ids.
_DEEPSEEK_MARKERS = (
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)

# Kimi-K2's special tokens at the ids its tokenizer gives them (BOS and EOS also in its config.json).
_KIMI_IDS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|im_system|>": 163594,
    "<|im_middle|>": 163601,
}


@dataclass(frozen=True)
class Arrangement:
    """What one family's tokenizer files hold."""

    bos: str
    eos: str
    markers: tuple[str, ...]  # further special tokens (the chat template's)
    template: str | None  # file name under chat_templates/, or None: the family ships no Jinja template
    tokenizer_class: str
    add_bos: bool
    real_ids: dict[str, int] = field(default_factory=dict)  # used when every one fits the vocabulary
    generation: dict = field(default_factory=dict)  # generation_config.json, token ids filled in by write
    extra: dict = field(default_factory=dict)  # further tokenizer_config.json keys


_DEEPSEEK_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
_DEEPSEEK_CONFIG = {"legacy": True, "model_max_length": 131072, "sp_model_kwargs": {}, "unk_token": None}


def _deepseek(template: str | None) -> Arrangement:
    return Arrangement(
        BOS, EOS, _DEEPSEEK_MARKERS, template, "LlamaTokenizerFast", True,
        generation=_DEEPSEEK_GENERATION, extra=_DEEPSEEK_CONFIG,
    )  # fmt: skip


# DeepSeek-V4 (docs/format-v4.md 6): PreTrainedTokenizerFast, no BOS added by the tokenizer (the prompt encoder
# writes it), no chat template (the release ships encoding/encoding_dsv4.py instead), 1M context.
_DEEPSEEK_V4 = Arrangement(
    BOS, EOS, ("<｜User｜>", "<｜Assistant｜>"), None, "PreTrainedTokenizerFast", False,
    generation={"do_sample": True, "temperature": 1.0, "top_p": 1.0},
    extra={"legacy": True, "model_max_length": 1048576, "sp_model_kwargs": {}, "unk_token": None},
)  # fmt: skip

ARRANGEMENTS = {
    "deepseek_v3": _deepseek("deepseek-v3.jinja"),
    "deepseek_v32": _deepseek(None),
    "deepseek_v2": _deepseek("deepseek-v2.jinja"),
    "deepseek_v4": _DEEPSEEK_V4,
    "kimi_k2": Arrangement(
        "[BOS]",
        "[EOS]",
        ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"),
        "kimi-k2.jinja",
        "PreTrainedTokenizerFast",
        False,
        real_ids=_KIMI_IDS,
        generation={"max_length": 131072, "eos": "<|im_end|>"},
        extra={"model_max_length": 131072},
    ),
}

TRANSFORMERS_VERSION = "4.46.3"  # what DeepSeek-V3's generation_config.json records


def arrangement(model_type: str) -> Arrangement:
    """The tokenizer arrangement of a family (``ConfigError`` for a model type without one)."""
    a = ARRANGEMENTS.get(model_type)
    if a is None:
        raise ConfigError(f"no tokenizer arrangement for model_type {model_type!r} (known: {', '.join(ARRANGEMENTS)})")
    return a


def chat_template_text(name: str) -> str:
    """A template shipped with the package (``chat_templates/NAME``)."""
    return resources.files("dsv3_tools").joinpath("chat_templates", name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------- the byte-level BPE
def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet: a printable character for each byte value."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_MERGE_WORDS = (
    "the and that with this from have model weight layer token expert check value tensor scale shard cast "
    "verify deep seek hello world what is time number code quick brown fox jumps over lazy dog"
).split()


def special_ids(a: Arrangement, vocab_size: int, bos_id: int | None, eos_id: int | None) -> dict[str, int]:
    """Ids of the special tokens: the real ones when they all fit, else BOS/EOS from the config (default 0 and 1)
    and the markers packed at the top of the vocabulary."""
    if a.real_ids and max(a.real_ids.values()) < vocab_size:
        return dict(a.real_ids)
    ids = {a.bos: 0 if bos_id is None else bos_id, a.eos: 1 if eos_id is None else eos_id}
    top = vocab_size - len(a.markers)
    ids |= {m: top + i for i, m in enumerate(a.markers)}
    if len(set(ids.values())) != len(ids) or min(ids.values()) < 0 or max(ids.values()) >= vocab_size:
        raise ConfigError(f"vocab_size {vocab_size} cannot hold the special tokens at ids {sorted(ids.values())}")
    return ids


def tokenizer_json(a: Arrangement, vocab_size: int, specials: dict[str, int]) -> dict:
    """A byte-level BPE ``tokenizer.json``: bytes and merges take the lowest ids the special tokens leave free."""
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)
    alphabet = _byte_chars()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = next(free)
    merges: list[list[str]] = []
    limit = min(vocab_size, 1024) - len(taken)
    space = alphabet[ord(" ")]
    for word in _MERGE_WORDS:
        toks = [space] + [alphabet[b] for b in word.encode()]
        cur = toks[0]
        for t in toks[1:]:
            new = cur + t
            if new not in vocab:
                if len(vocab) >= limit:
                    break
                merges.append([cur, t])
                vocab[new] = next(free)
            cur = new
    if len(vocab) + len(taken) > vocab_size:
        raise ConfigError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer")
    vocab |= specials
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    added = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for c, i in sorted(specials.items(), key=lambda kv: kv[1])
    ]  # fmt: skip
    post = None
    if a.add_bos:
        bos = {"SpecialToken": {"id": a.bos, "type_id": 0}}
        post = {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {a.bos: {"id": a.bos, "ids": [specials[a.bos]], "tokens": [a.bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}  # fmt: skip


def tokenizer_config(a: Arrangement) -> dict:
    """``tokenizer_config.json``: class, BOS/EOS (as the real files write them), chat template where there is one."""
    out = {
        "add_bos_token": a.add_bos,
        "add_eos_token": False,
        "bos_token": _added_token(a.bos),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token(a.eos),
        "pad_token": _added_token(a.eos),
        **a.extra,
        "tokenizer_class": a.tokenizer_class,
    }
    if a.template is not None:
        out["chat_template"] = chat_template_text(a.template)
    return out


def generation_config(a: Arrangement, specials: dict[str, int]) -> dict:
    """``generation_config.json`` with the family's keys and the special tokens' ids."""
    if "eos" in a.generation:  # Kimi-K2 stops at the end of a turn, not at [EOS]
        g = dict(a.generation)
        return {"max_length": g["max_length"], "eos_token_id": specials[g["eos"]]}
    return {
        "_from_model_config": True,
        "bos_token_id": specials[a.bos],
        "eos_token_id": specials[a.eos],
        **a.generation,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def write_tokenizer_files(out: str | Path, cfg: ModelConfig | V4Config) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` for ``cfg``'s family
    into ``out``; return the special tokens' ids."""
    out = Path(out)
    a = arrangement(cfg.model_type)
    specials = special_ids(a, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    write_json_atomic(out / "tokenizer.json", tokenizer_json(a, cfg.vocab_size, specials))
    write_json_atomic(out / "tokenizer_config.json", tokenizer_config(a))
    write_json_atomic(out / "generation_config.json", generation_config(a, specials))
    return specials
