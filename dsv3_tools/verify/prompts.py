"""The prompts a verify run uses: the built-in set, a text file through the checkpoint's tokenizer, or token ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import Dsv3Error
from .reference import PROJ_SEED

DEFAULT_PROMPTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6. 深度求索 (DeepSeek) 检查点验证。",
    "A checkpoint converted from one format to another should compute exactly what the original computed. "
    "This tool runs the model on a few prompts, keeps the logits of every position and a summary of every "
    "layer's hidden states, and compares them with a reference made from the original checkpoint, so that a "
    "wrong scale, a swapped expert or a truncated shard is found and named before anyone serves the model.",
)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line (``\\n`` inside a line stays literal text)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Dsv3Error(f"{path}: cannot read prompts ({e.__class__.__name__})") from None
    texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise Dsv3Error(f"{path}: no prompts (one text per line)")
    return texts


def read_tokens_file(path: str | Path) -> list[list[int]]:
    """A JSON list of lists of token ids."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Dsv3Error(f"{path}: not a readable JSON file ({e.__class__.__name__})") from None
    if (
        not isinstance(data, list)
        or not data
        or not all(
            isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in data
        )
    ):
        raise Dsv3Error(f"{path}: expected a JSON list of non-empty lists of integer token ids")
    return data


def tokenize(folder: str | Path, texts: list[str]) -> list[list[int]]:
    """Token ids of each text through the checkpoint's ``tokenizer.json`` (special tokens as it defines them)."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        raise Dsv3Error(f"{folder}: no tokenizer.json to tokenize the prompts; pass --tokens instead")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises its own exception type for a bad file
        raise Dsv3Error(f"{p}: cannot load the tokenizer ({e})") from None
    return [tok.encode(t).ids for t in texts]


def default_ids(folder: Path, vocab: int) -> list[list[int]]:
    """The built-in prompts through the checkpoint's tokenizer, or fixed pseudo-random ids when it has none."""
    if (folder / "tokenizer.json").is_file():
        return tokenize(folder, list(DEFAULT_PROMPTS))
    g = torch.Generator().manual_seed(PROJ_SEED)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (2, 11, 33, 47, 120)]


def check_ids(ids: list[list[int]], vocab: int) -> None:
    for i, row in enumerate(ids):
        if not row:
            raise Dsv3Error(f"prompt {i} is empty")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise Dsv3Error(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
