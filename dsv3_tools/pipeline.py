"""Bounded background work: read ahead of a consumer, write behind a producer, always joined.

Streaming stages overlap disk reads, compute, hashing and disk writes by handing work to helper threads through
bounded queues, so memory stays at a few buffers whatever the checkpoint's size. Two shapes cover every use:

- ``ReadAhead(source, depth)``: iterates ``source`` on a helper thread, at most ``depth`` items ahead of the
  consumer (cast's chunk reader);
- ``WriteBehind(fn, depth)``: calls ``fn(item)`` on a helper thread for each item put, at most ``depth`` queued
  (the safetensors writer's hash / stage / write chain, shard's per-rank writers).

Both re-raise a helper's error in the caller's thread, wake up from every blocking call regularly to notice a stop
(an error elsewhere, an abort, Ctrl-C in the caller), and join their thread when closed or aborted: a helper thread
still running inside torch when the interpreter exits aborts the process (``std::terminate``), so none may outlive
the work it serves. Stages chained to each other share one stop event, so a failure anywhere stops them all.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()
_TICK = 0.1  # seconds between checks of the stop event while blocked


class Stopped(Exception):
    """A helper saw the pipeline stop (an abort, or a failure in another stage)."""


def put_until(q: queue.Queue, item: object, stop: threading.Event) -> None:
    """``q.put(item)``, giving up with ``Stopped`` once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_TICK)
            return
        except queue.Full:
            continue
    raise Stopped


def get_until(q: queue.Queue, stop: threading.Event) -> Any:
    """``q.get()``, giving up with ``Stopped`` once ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=_TICK)
        except queue.Empty:
            continue
    raise Stopped


class _Helper:
    """One helper thread with a bounded queue, a stop event (possibly shared) and the error it hit."""

    def __init__(self, depth: int, name: str, stop: threading.Event | None) -> None:
        self.stop = stop or threading.Event()
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._guard, daemon=True, name=name)

    def _guard(self) -> None:
        try:
            self._run()
        except Stopped:
            pass
        except BaseException as e:  # re-raised in the caller's thread
            self.error = e
            self.stop.set()

    def _run(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise the error this helper hit, if any."""
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop now (queued work is dropped) and wait for the thread."""
        self.stop.set()
        self._join()

    def _join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


class WriteBehind(_Helper):
    """Calls ``fn(item)`` on a helper thread for every ``put(item)``, in order, at most ``depth`` items queued.

    The caller hands each item over: it must not change it afterwards. ``on_end()`` runs on the helper thread after
    the last item, when the stage is closed (e.g. to flush a partly filled buffer downstream).
    """

    def __init__(
        self,
        fn: Callable[[Any], None],
        *,
        depth: int = 2,
        name: str = "dsv3-write",
        on_end: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(depth, name, stop)
        self.fn, self.on_end = fn, on_end
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = get_until(self._q, self.stop)
            if item is _END:
                if self.on_end is not None:
                    self.on_end()
                return
            self.fn(item)

    def put(self, item: object) -> None:
        """Queue ``item``; raise this stage's error, or ``Stopped`` when the pipeline has stopped."""
        self.check()
        try:
            put_until(self._q, item, self.stop)
        except Stopped:
            self.check()
            raise

    def close(self) -> None:
        """Process everything queued, run ``on_end``, wait for the thread; raise what it hit."""
        try:
            put_until(self._q, _END, self.stop)
        except Stopped:
            pass
        self._join()
        self.check()


class ReadAhead(_Helper):
    """Iterates ``source`` on a helper thread, at most ``depth`` items ahead of the consumer.

    Use as a context manager (or call ``close``): leaving the loop early stops the reader and waits for it.
    """

    def __init__(self, source: Iterable, *, depth: int = 2, name: str = "dsv3-read") -> None:
        super().__init__(depth, name, None)
        self.source = source
        self._thread.start()

    def _run(self) -> None:
        for x in self.source:
            put_until(self._q, (True, x), self.stop)
        put_until(self._q, (False, None), self.stop)

    def __iter__(self) -> Iterator:
        while True:
            try:
                more, x = get_until(self._q, self.stop)
            except Stopped:
                self.check()
                raise
            if not more:
                return
            yield x

    def close(self) -> None:
        self.abort()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_error(stages: Iterable[_Helper]) -> BaseException | None:
    """The first real error among chained stages (a ``Stopped`` is only the echo of one)."""
    return next((s.error for s in stages if s.error is not None), None)


class BufferRing:
    """A few reusable buffers, each handed to several consumers; a buffer is reused only when all are done with it.

    ``take(users)`` waits for the next buffer in turn to be free and marks it in use by ``users`` consumers; each
    consumer calls ``release(buf)`` when done. Memory stays at ``len(buffers)`` buffers whatever the fan-out.
    """

    def __init__(self, buffers: list, stop: threading.Event) -> None:
        self.buffers = buffers
        self.stop = stop
        self._users = [0] * len(buffers)
        self._next = 0
        self._cv = threading.Condition()

    def take(self, users: int) -> tuple[int, Any]:
        i = self._next
        self._next = (i + 1) % len(self.buffers)
        with self._cv:
            while self._users[i] and not self.stop.is_set():
                self._cv.wait(_TICK)
            if self.stop.is_set():
                raise Stopped
            self._users[i] = users
        return i, self.buffers[i]

    def release(self, i: int) -> None:
        with self._cv:
            self._users[i] -= 1
            self._cv.notify_all()
