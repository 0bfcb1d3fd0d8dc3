"""Batch input and output: prompt files, requests, batches of ``--max-batch-size``, one JSON object per request.

An input file is plain text (one prompt per non-empty line) or JSON Lines (a ``.jsonl`` name, or a first
non-blank character ``{``): each line an object with ``prompt`` (a string) or ``messages`` (a list of
``{"role", "content"}``), and optionally ``system``, ``max_new_tokens``, ``stop`` (a string or a list), ``seed``
and the sampling fields ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``. Anything else is
refused with the line named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Dsv3Error
from .chat import Message
from .sampling import SamplingParams

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
LINE_FIELDS = {"prompt", "messages", "system", "max_new_tokens", "stop", "seed", *SAMPLING_FIELDS}


@dataclass
class Entry:
    """One prompt as given: text or a conversation, and what this line overrides."""

    where: str  # "FILE line N" or "--prompt N", for messages
    prompt: str | None = None
    messages: list[Message] | None = None
    system: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # sampling fields, max_new_tokens, stop, seed


@dataclass
class Request:
    """A prompt ready to run: its ids and how to continue it."""

    index: int
    prompt: str | list[Message]  # as given, for the output
    ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int


@dataclass
class Result:
    """One request's outcome (``--json`` prints one per line)."""

    index: int
    prompt: str | list[Message]
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # eos, stop, length, or interrupted (Ctrl-C)
    prefill_seconds: float  # the prefill of the batch this request ran in
    decode_seconds: float  # from the end of that prefill to this request's last token
    seed: int
    speculative: dict | None = None  # --speculative mtp: {"drafted": n, "accepted": k}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_seconds"] = round(d["prefill_seconds"], 6)
        d["decode_seconds"] = round(d["decode_seconds"], 6)
        if d["speculative"] is None:
            del d["speculative"]
        return d


def entries_from_prompts(prompts: list[str]) -> list[Entry]:
    return [Entry(f"--prompt {i + 1}", prompt=p) for i, p in enumerate(prompts)]


def read_input_file(path: str | Path) -> list[Entry]:
    """The entries of a plain-text or JSONL prompt file (``Dsv3Error`` naming the line for a bad one)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Dsv3Error(f"{path}: cannot read the input file ({e.__class__.__name__})") from None
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    if not numbered:
        raise Dsv3Error(f"{path}: no prompts (plain text: one per line; JSONL: one object per line)")
    if path.suffix != ".jsonl" and not numbered[0][1].lstrip().startswith("{"):
        return [Entry(f"{path} line {n}", prompt=ln) for n, ln in numbered]
    return [_json_entry(f"{path} line {n}", ln) for n, ln in numbered]


def _json_entry(where: str, line: str) -> Entry:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise Dsv3Error(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise Dsv3Error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - LINE_FIELDS)
    if unknown:
        raise Dsv3Error(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(LINE_FIELDS))})")
    if ("prompt" in obj) == ("messages" in obj):
        raise Dsv3Error(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise Dsv3Error(f"{where}: 'prompt' must be a string")
    msgs = obj.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            raise Dsv3Error(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise Dsv3Error(f"{where}: message {i} needs a string 'role' and a string 'content'")
    if "system" in obj and not isinstance(obj["system"], str):
        raise Dsv3Error(f"{where}: 'system' must be a string")
    stop = obj.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):  # fmt: skip
        raise Dsv3Error(f"{where}: 'stop' must be a string or a list of strings")
    for k in ("max_new_tokens", "seed", "top_k"):
        if k in obj and (not isinstance(obj[k], int) or isinstance(obj[k], bool)):
            raise Dsv3Error(f"{where}: '{k}' must be an integer")
    for k in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if k in obj and (not isinstance(obj[k], (int, float)) or isinstance(obj[k], bool)):
            raise Dsv3Error(f"{where}: '{k}' must be a number")
    over = {k: obj[k] for k in (*SAMPLING_FIELDS, "max_new_tokens", "seed") if k in obj}
    if stop is not None:
        over["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return Entry(where, prompt=obj.get("prompt"), messages=msgs, system=obj.get("system"), overrides=over)


def batches(requests: list[Request], size: int) -> Iterator[list[Request]]:
    """Consecutive groups of at most ``size`` requests (prompts of any lengths together)."""
    for i in range(0, len(requests), size):
        yield requests[i : i + size]


def json_line(result: Result) -> str:
    return json.dumps(result.as_dict(), ensure_ascii=False)
