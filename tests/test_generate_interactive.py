"""The interactive chat driven through a pseudo-terminal, as a person uses it: two turns, ``/clear``, Ctrl-C while
an answer streams (the answer stops, the prompt comes back, the process lives on), ``/exit``."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal (so Ctrl-C there sends SIGINT, as in
    a real one), read until a pattern shows."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            try:
                os.execvpe(cmd[0], cmd, env)
            finally:
                os._exit(127)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        """Output since the last call, up to and including ``pattern`` (a regex)."""
        end = time.monotonic() + timeout
        start = len(self.seen)
        while not re.search(pattern, self.seen[start:]):
            left = end - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; output so far:\n{self.seen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    assert re.search(pattern, self.seen[start:]), self.seen[-3000:]
        m = re.search(pattern, self.seen[start:])
        return self.seen[start : start + m.end()]

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self, timeout: float = 30.0) -> int:
        """Wait for the child; its exit code."""
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.pid = 0
                    return os.waitstatus_to_exitcode(status)
                try:  # keep draining, or a child still writing would block
                    if select.select([self.master], [], [], 0.2)[0]:
                        self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:
                    time.sleep(0.1)
            raise AssertionError(f"the chat did not exit; output:\n{self.seen[-3000:]}")
        finally:
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            os.close(self.master)


def test_chat_two_turns_clear_ctrl_c_exit(tiny_fp8: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb")
    cmd = [sys.executable, "-m", "dsv3_tools", "generate", str(tiny_fp8), "--temperature", "0", "--ignore-eos",
           "--max-new-tokens", "1500", "--max-seq-len", "2048"]  # fmt: skip
    t = Terminal(cmd, env)
    try:
        t.read_until("memory plan")
        t.read_until(">>> ")
        # Without EOS (--ignore-eos) an answer would run 1500 tokens: Ctrl-C once some text has streamed stops it,
        # the prompt comes back, and the second turn (the first one in its history) works the same way.
        t.send("hello\n")
        first = t.read_until(r"\S{8}", timeout=60)  # the answer has started streaming
        t.send("\x03")
        after = t.read_until(">>> ", timeout=60)
        assert "(stopped)" in after, first + after
        t.send("and then?\n")
        t.read_until(r"\S{8}", timeout=60)
        t.send("\x03")
        assert "(stopped)" in t.read_until(">>> ", timeout=60)
        t.send("/clear\n")
        assert "(conversation cleared)" in t.read_until(">>> ")
        # Ctrl-C at the prompt only gives a new prompt. (A pause first: CPython's readline misses a SIGINT that
        # arrives after it printed the prompt but before it waits for input, until the next key; people are slower.)
        time.sleep(0.5)
        t.send("\x03")
        t.read_until(">>> ")
        t.send("/exit\n")
        assert t.close() == 0
    finally:
        if t.pid:
            t.close(timeout=1)
