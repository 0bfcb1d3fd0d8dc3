"""The interactive chat: ``>>>`` prompts, multi-turn history through the chat template, streamed answers.

``/exit`` (or end of input) leaves, ``/clear`` forgets the conversation, Ctrl-C during an answer stops it and
returns to the prompt (the part already shown stays in the history), Ctrl-C at the prompt gives a new prompt.
Each turn renders the whole conversation and prefills it again (the cache is not kept between turns).
Under torchrun only rank 0 reads and prints; Ctrl-C is turned into a flag that rank 0 checks after each step and
passes on with the step's tokens, so the other ranks (which ignore SIGINT) stop at the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import Dsv3Error
from .batch import Request
from .chat import Message, Tokenizer
from .engine import Engine
from .sampling import SamplingParams


@dataclass
class ChatIO:
    read: Callable[[str], str]  # a line of input after the prompt (raises EOFError at the end)
    write: Callable[[str], None]  # answer text, as it streams
    info: Callable[[str], None]  # a status line


@contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """While inside: Ctrl-C sets the event instead of raising (main thread only; elsewhere the event stays unset)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(
    engine: Engine,
    tok: Tokenizer,
    io: ChatIO,
    *,
    params: SamplingParams,
    max_new_tokens: int,
    stop: tuple[str, ...],
    seed: int,
    system: str | None = None,
    raw: bool = False,
) -> None:
    """Run the chat until ``/exit`` or end of input (rank 0)."""
    history: list[Message] = []
    turn = 0
    io.info("chat: /exit to leave, /clear to forget the conversation, Ctrl-C to stop an answer")
    while True:
        try:
            line = io.read(">>> ")
        except EOFError:
            io.write("\n")
            break
        except KeyboardInterrupt:
            io.write("\n")
            continue
        command = line.strip()
        if command == "/exit":
            break
        if command == "/clear":
            history.clear()
            io.info("(conversation cleared)")
            continue
        if not command:
            continue
        turn_msgs = history + [{"role": "user", "content": line}]
        try:
            if raw:
                ids = tok.raw_ids(line)
            else:
                ids = tok.chat_ids(([{"role": "system", "content": system}] if system else []) + turn_msgs)
        except Dsv3Error as e:
            io.info(f"error: {e}")
            continue
        if len(ids) >= engine.max_len:
            io.info(
                f"the conversation is {len(ids)} tokens and --max-seq-len is {engine.max_len}: "
                "/clear it, or start again with a larger --max-seq-len"
            )
            continue
        req = Request(turn, line, ids, params, max_new_tokens, stop, seed + turn)
        with interrupt_flag() as flag:
            (result,) = engine.run([req], on_text=lambda _, piece: io.write(piece), should_stop=flag.is_set)
        io.write("\n")
        if result.finish_reason == "interrupted":
            io.info("(stopped)")
        if not raw:
            history = turn_msgs + [{"role": "assistant", "content": result.text}]
        turn += 1
