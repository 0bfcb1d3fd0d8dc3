"""Text in and out: the checkpoint's tokenizer, its chat template rendered by Jinja, incremental decoding, stops.

``Tokenizer.load`` reads what a Hugging Face folder ships beside the weights: ``tokenizer.json`` (through the
``tokenizers`` library), ``tokenizer_config.json`` (BOS/EOS, ``chat_template``; or ``chat_template.jinja``) and
``generation_config.json`` (EOS ids, sampling defaults). The template is rendered by jinja2 in a sandbox set up as
transformers' ``apply_chat_template`` sets it up (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson``
that keeps non-ASCII text, ``raise_exception``, ``strftime_now``; the special tokens passed as variables), so a
prompt renders to the same text, and its ids are that text's, special tokens included (no BOS added twice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import Dsv3Error

Message = dict[str, Any]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Dsv3Error(f"{path}: not a readable JSON file ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise Dsv3Error(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an ``AddedToken`` dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class ChatTemplate:
    """A chat template compiled once; ``render`` gives the prompt text."""

    def __init__(self, text: str, special: dict[str, str]):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise Dsv3Error(f"the chat template does not compile: {e} (line {e.lineno})") from None
        self.text = text
        self.special = dict(special)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special,
            )  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise Dsv3Error(f"the chat template refused the conversation: {e}") from None


@dataclass
class Tokenizer:
    """The checkpoint's tokenizer, template and stopping tokens."""

    folder: Path
    backend: Any  # tokenizers.Tokenizer
    template: ChatTemplate | None
    eos_ids: frozenset[int]
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... (as the template sees them)
    generation_config: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            extra = " (a tiktoken tokenizer, as Kimi-K2 ships, is not supported)" if (folder / "tiktoken.model").is_file() else ""  # fmt: skip
            raise Dsv3Error(
                f"{folder}: no tokenizer.json{extra}: generate needs the checkpoint's tokenizer files beside the weights"
            )
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type for a bad file
            raise Dsv3Error(f"{path}: cannot load the tokenizer ({e})") from None
        tc = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        gc = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        special = {
            k: t for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (t := _token_text(tc.get(k))) is not None
        }  # fmt: skip
        text = tc.get("chat_template")
        if isinstance(text, list):  # named templates: the default one
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
        if text is None and (folder / "chat_template.jinja").is_file():
            text = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if text is not None and not isinstance(text, str):
            raise Dsv3Error(f"{folder / 'tokenizer_config.json'}: chat_template is not a string")
        eos: set[int] = set()
        g_eos = gc.get("eos_token_id")
        for i in g_eos if isinstance(g_eos, list) else [g_eos]:
            if isinstance(i, int) and not isinstance(i, bool):
                eos.add(i)
        if "eos_token" in special and (i := backend.token_to_id(special["eos_token"])) is not None:
            eos.add(i)
        tpl = ChatTemplate(text, special) if text is not None else None
        return cls(folder, backend, tpl, frozenset(eos), special, gc)

    # ------------------------------------------------------------------ ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_ids(self, messages: list[Message]) -> list[int]:
        """The ids of a conversation rendered with the template, ending with the assistant's turn."""
        if self.template is None:
            raise Dsv3Error(self.no_template_message())
        return self.encode(self.template.render(messages, add_generation_prompt=True), add_special_tokens=False)

    def raw_ids(self, text: str) -> list[int]:
        """The ids of plain text, with the special tokens the tokenizer adds itself (BOS for DeepSeek)."""
        return self.encode(text, add_special_tokens=True)

    def no_template_message(self) -> str:
        return (
            f"{self.folder} has no chat template (tokenizer_config.json has no chat_template; DeepSeek-V3.2 ships a "
            "Python prompt encoder instead): pass --raw to send the prompt text as it is"
        )


class IncrementalText:
    """Text of a growing list of token ids, released piece by piece: a piece is given out only once it decodes
    to complete characters, so a multi-byte character split over several tokens is never cut."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""  # what was given out
        self._prefix = 0  # ids[_prefix:_read] decode to the end of ``text``: the context for the next piece
        self._read = 0

    def add(self, token: int) -> str:
        """Append a token; return the new text it completes ('' while a character is still partial)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self._prefix : self._read])
        now = self.tok.decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            piece = now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character shows as U+FFFD)."""
        before = self.tok.decode(self.ids[self._prefix : self._read])
        now = self.tok.decode(self.ids[self._prefix :])
        piece = now[len(before) :] if now.startswith(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


class StopText:
    """Stop strings over streamed text: ``feed`` returns what may be shown (never the start of a stop string that
    may still complete) and whether a stop string appeared (the text then ends before it)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.shown = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.stops:
            longest = max(len(s) for s in self.stops)
            start = max(0, self.shown - longest + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.hit = True
                return self._release(len(self.text))
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            return self._release(len(self.text) - hold)
        return self._release(len(self.text))

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.shown)
        out = self.text[self.shown : upto]
        self.shown = upto
        return out
