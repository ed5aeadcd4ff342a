"""Run a function over a stream of items in forked worker processes, results in order.

Tokenizing a large input is CPU-bound, and threads do not spread it over the cores:
sentencepiece's Python binding holds the GIL while it converts its input and builds
its id lists, and formatting the ids is Python code too. Forked processes each have
their own interpreter and share the already loaded tokenizer for free.

`ordered_map` decides per input: bulk input (a file, a fast pipe) goes to the pool,
a trickle (`tail -f log | toolbox tokenize`) stays in this process, where every
line is answered as soon as it arrives.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from toolbox.textio import prefetch

T = TypeVar("T")
R = TypeVar("R")
BULK = 32 << 10  # a first block at least this big means the input comes in bulk
_LENGTH = struct.Struct("<Q")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterator[T],
    *,
    processes: int,
    size: Callable[[T], int],
    initializer: Callable[[], None] | None = None,
) -> Iterator[R]:
    """`fn` over `items`, in order: in forked processes when the first item's size shows
    bulk input, otherwise in a thread that works one item ahead of the consumer.

    `initializer` runs once in each forked process before its first item.
    """
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if processes > 1 and _can_fork() and size(first) >= BULK:
        with ForkPool(fn, processes, initializer) as pool:
            yield from pool.imap(items)
    else:
        yield from prefetch(map(fn, items))


def _can_fork() -> bool:
    # macOS has fork, but system frameworks may not survive it without exec (which is why
    # Python's multiprocessing spawns there); Windows has none.
    return hasattr(os, "fork") and sys.platform != "darwin"


class ForkPool:
    """Forked processes that each apply `fn` to the items sent to them, round robin.

    Items and results travel pickled over pipes; an exception raised by `fn` is
    raised again in the parent when its result's turn comes.
    """

    def __init__(self, fn: Callable[[T], R], processes: int, initializer: Callable[[], None] | None = None):
        self._workers: list[_Worker] = []
        for _ in range(processes):
            self._workers.append(_Worker.fork(fn, initializer, inherited=self._workers))

    def imap(self, items: Iterable[T]) -> Iterator[R]:
        """Results of `fn` in the order of `items`; sending runs in a thread ahead of receiving."""
        workers = self._workers

        def send_all():
            for worker, item in zip(itertools.cycle(workers), items):
                worker.send(item)
                yield worker

        for worker in prefetch(send_all(), depth=2 * len(workers)):
            yield worker.receive()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> ForkPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    def __init__(self, pid: int, requests, replies):
        self.pid, self._requests, self._replies = pid, requests, replies

    @classmethod
    def fork(cls, fn, initializer, inherited: list[_Worker]) -> _Worker:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                os.close(request_w)
                os.close(reply_r)
                for other in inherited:  # so that each worker sees EOF when the parent closes
                    other._close_files()
                if initializer is not None:
                    initializer()
                _serve(fn, os.fdopen(request_r, "rb"), os.fdopen(reply_w, "wb"))
                code = 0
            finally:
                os._exit(code)
        os.close(request_r)
        os.close(reply_w)
        return cls(pid, os.fdopen(request_w, "wb"), os.fdopen(reply_r, "rb"))

    def send(self, item) -> None:
        _write(self._requests, pickle.dumps(item, pickle.HIGHEST_PROTOCOL))

    def receive(self):
        payload = _read(self._replies)
        if payload is None:
            raise RuntimeError(f"worker process {self.pid} exited unexpectedly")
        ok, value = pickle.loads(payload)
        if not ok:
            raise value
        return value

    def _close_files(self) -> None:
        for f in (self._requests, self._replies):
            try:
                f.close()
            except OSError:
                pass

    def stop(self) -> None:
        # Killed first: it may still be working on an item nobody will read, and the
        # sending thread may be blocked writing to it, holding the pipe's lock.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self._close_files()


def _serve(fn, requests, replies) -> None:
    while (payload := _read(requests)) is not None:
        try:
            reply = (True, fn(pickle.loads(payload)))
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the caller
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            data = pickle.dumps((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
        _write(replies, data)


def _write(f, data: bytes) -> None:
    f.write(_LENGTH.pack(len(data)))
    f.write(data)
    f.flush()


def _read(f) -> bytes | None:
    header = f.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    return f.read(_LENGTH.unpack(header)[0])
