"""The server's engine: one thread that owns the model's `Batcher` and feeds asyncio.

HTTP handlers run on the event loop; they `submit` sequences (one per prompt and
sample) and read their tokens from an `asyncio.Queue`. The engine thread takes new
sequences and cancellations between steps, calls `Batcher.step()` to advance every
running sequence by one token, turns tokens into text with a `TextAssembler` per
sequence (UTF-8-safe, stop strings, `<NL>`), and hands each step's output to the
loop in one `call_soon_threadsafe`. Only the `Batcher` protocol is used, so any
backend's batcher (static or continuous) works.

Admission is bounded: at most `max_batch_size + max_queue` sequences are admitted at
once; beyond that `submit` raises `Overloaded` (the app answers 429 with
Retry-After). A cancelled sequence (its client left) frees its place immediately.
Work that must not run beside generation on another thread (scoring) goes through
`call`, which runs a function on the engine thread between steps. With a batcher
that runs one group at a time (`StaticBatcher`), the engine pauses briefly before a
new group so that returning clients join it (see `Engine._gather`).

On Linux the engine thread lowers its own CPU priority (`nice`, per thread there) by
`nice` steps: when the model keeps the CPU busy, the HTTP thread still gets it as soon
as a request or a chunk is ready, which keeps time to first token low under load;
the engine loses nothing when the CPU has room.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from toolbox.streaming import TextAssembler
from toolbox.types import GenerationParams, SequenceRequest

log = logging.getLogger("toolbox.serve")


class Overloaded(Exception):
    """The engine's queue is full; try again later."""


class NotAccepting(Exception):
    """The engine is draining for shutdown (or is stopped)."""


class EngineFailure(Exception):
    """The backend failed while generating (a server fault, not the client's)."""


@dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate: prompt ids, settings (n = 1; `stop` is applied here), `<NL>` convention."""

    prompt: list[int]
    params: GenerationParams
    nl: bool = False


@dataclass(frozen=True)
class Output:
    """One token of sequence `index` of a submission, with the text it made final."""

    index: int
    token_id: int
    logprob: float
    text: str
    finish_reason: str | None  # "stop" (EOS or a stop string), "length", or None
    top: tuple[tuple[int, float], ...] | None = None  # the most likely tokens, when the request asked


class Submission:
    """The sequences of one request; iterate `outputs()` on the event loop."""

    def __init__(self, engine: Engine, count: int, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.count = count
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.sequences: list[_Sequence] = []
        # outputs handed over (engine thread) and taken (event loop): each counter has one writer
        self.delivered = 0
        self.taken = 0
        self.read_at = time.monotonic()  # when the reader last took something

    def _took(self, count: int) -> None:
        self.taken += count
        self.read_at = time.monotonic()

    async def outputs(self):
        """Yield `Output`s until every sequence has finished; raises EngineFailure on a backend error."""
        remaining = self.count
        while remaining:
            item = await self.queue.get()
            self._took(1)
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item

    async def batches(self):
        """Like `outputs`, but everything available at once as a list (one engine step's worth, or more)."""
        remaining = self.count
        while remaining:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            self._took(len(items))
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
            yield items

    def cancel(self) -> None:
        """Stop every unfinished sequence (the client went away); safe to call more than once."""
        self.engine.cancel(self)


class _Sequence:
    __slots__ = ("id", "index", "spec", "sub", "text", "done", "started")

    def __init__(self, seq_id: int, index: int, spec: SequenceSpec, sub: Submission, token_bytes):
        self.id, self.index, self.spec, self.sub = seq_id, index, spec, sub
        self.text = TextAssembler(token_bytes, spec.params.stop, spec.nl)
        self.done = False  # finished or cancelled (guarded by the engine's lock)
        self.started = False  # produced a token


def batch_params(params: GenerationParams) -> GenerationParams:
    """What the batcher sees: stop strings are handled by the engine and n is always 1.

    Dropping them lets requests that differ only in their stop strings share a batch.
    """
    return replace(params, stop=(), n=1)


class Engine:
    """Runs `model.batcher(max_batch_size)` (`model`: a `toolbox.backend.LoadedModel`) on its own
    thread; see the module docstring."""

    def __init__(self, model, max_batch_size: int, max_queue: int, metrics=None, batch_wait: float = 0.03,
                 nice: int = 0, stall_timeout: float = 60.0):
        self.model = model
        self.stall_timeout = stall_timeout
        self.nice = nice
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.limit = max_batch_size + max_queue
        self.metrics = metrics
        self.batch_wait = batch_wait
        self._token_bytes = model.tokenizer.token_bytes
        self._batcher = model.batcher(max_batch_size)
        # a batcher that runs one group at a time needs the gathering pause (see _gather);
        # one that admits requests into the running batch (continuous batching) does not
        self._groups = getattr(self._batcher, "runs_groups", False)
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._intake: list[_Sequence] = []
        self._cancels: list[_Sequence] = []
        self._calls: list[tuple[Callable, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._admitted = 0  # sequences and calls admitted and not yet done (guarded by _cv)
        self._accepting = True
        self._stopping = False
        self._live: dict[int, _Sequence] = {}  # in the batcher (engine thread only)
        self._backlog: dict[int, deque[_Sequence]] = {}  # admitted, not yet in the batcher, by submission
        self._thread = threading.Thread(target=self._run, name="toolbox-engine", daemon=True)
        self.failure: BaseException | None = None
        self._running = 0  # sequences in the batch after the last step (engine thread writes)
        self._peak = 0  # most sequences in flight while the current batch runs
        self._last_peak = 0  # ... while the previous batch ran
        self._ended_at = float("-inf")  # when the previous batch emptied

    # -- the event loop's side --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def admitted(self) -> int:
        return self._admitted

    def submit(self, specs: list[SequenceSpec]) -> Submission:
        """Admit sequences (all or none); raises Overloaded or NotAccepting."""
        sub = Submission(self, len(specs), asyncio.get_running_loop())
        with self._cv:
            self._admit(len(specs))
            for index, spec in enumerate(specs):
                seq = _Sequence(next(self._ids), index, spec, sub, self._token_bytes)
                sub.sequences.append(seq)
                self._intake.append(seq)
            self._cv.notify()
        self._update_gauges()
        return sub

    def capacity_error(self, count: int) -> str | None:
        """Why `count` sequences could never be admitted at once, or None."""
        if count > self.limit:
            return f"{count} sequences exceed the server's limit of {self.limit} (--max-batch-size + --max-queue)"
        return None

    def cancel(self, sub: Submission) -> None:
        with self._cv:
            running = [seq for seq in sub.sequences if not seq.done]
            self._release(running)
            self._cancels += running
        self._update_gauges()

    async def call(self, fn: Callable):
        """Run `fn()` on the engine thread between steps and return its result (counts as one admitted job)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._admit(1)
            self._calls.append((fn, fut, loop))
            self._cv.notify()
        return await fut

    def _admit(self, count: int) -> None:
        if not self._accepting:
            raise NotAccepting("the server is shutting down")
        if self.failure is not None:
            raise NotAccepting("the engine has stopped")
        if self._admitted + count > self.limit:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise Overloaded(f"the queue is full ({self._admitted} sequences in flight, limit {self.limit})")
        self._admitted += count

    def drain(self, timeout: float) -> bool:
        """Stop accepting, wait (at most `timeout` s) for admitted work to finish, then stop the thread.

        Returns True when everything finished in time; unfinished sequences are failed.
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            self._accepting = False
            while self._admitted > 0 and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            clean = self._admitted == 0
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return clean

    # -- the engine thread ------------------------------------------------------

    def _run(self) -> None:
        _lower_priority(self.nice)
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request
            log.exception("engine thread crashed")
            self.failure = exc
            self._fail_all(exc)

    def _loop(self) -> None:
        while True:
            batcher = self._batcher
            with self._cv:
                while (not (self._intake or self._cancels or self._calls or self._stopping or self._backlog)
                       and batcher.pending() == 0):
                    self._cv.wait()
                if self._stopping:  # drain() waited for the admitted work (or gave up on it)
                    self._fail_all(NotAccepting("the server stopped before this request finished"))
                    return
                if self._groups and batcher.running() == 0 and (self._intake or batcher.pending()):
                    self._gather(batcher)
                intake, self._intake = self._intake, []
                cancels, self._cancels = self._cancels, []
                calls, self._calls = self._calls, []
            for seq in cancels:
                if self._live.pop(seq.id, None) is not None:
                    batcher.cancel(seq.id)
            for seq in intake:
                self._backlog.setdefault(id(seq.sub), deque()).append(seq)
            self._feed(batcher)
            for fn, fut, loop in calls:
                self._run_call(fn, fut, loop)
            if batcher.pending() > 0:
                try:
                    events = batcher.step()
                except Exception as exc:  # noqa: BLE001 - a backend fault fails the running requests, not the server
                    log.exception("generation step failed")
                    running = list(self._live.values())
                    self._live.clear()
                    with self._cv:
                        self._release(running)
                    _fail_requests(running, EngineFailure(f"generation failed: {type(exc).__name__}: {exc}"))
                    self._batcher = self.model.batcher(self.max_batch_size)
                    continue
                self._deliver(events)
                # a batcher that defers `add`, or isolates a failing row, reports those requests here
                for request_id, exc in getattr(batcher, "take_refused", list)():
                    seq = self._live.pop(request_id, None)
                    if seq is not None:
                        self._refuse(seq, exc)
                if batcher.pending() == 0 and self._live:  # the batcher dropped sequences without finishing them
                    self._fail_lost()
            self._cancel_stalled()
            running = batcher.running()
            if running:
                self._peak = max(self._peak, self._admitted)
            elif self._running:  # the batch just emptied: remember how busy it was
                self._last_peak, self._ended_at, self._peak = self._peak, time.monotonic(), 0
            self._running = running
            self._update_gauges()

    def _feed(self, batcher) -> None:
        """Hand waiting sequences to the batcher as it has room, one per request in turn.

        Admission is round-robin over requests, not first come first served: a request with
        a large `n` (or many prompts) gets a share of the batch, not all of it, so the requests
        behind it start as soon as any row frees up. Cancelled sequences are dropped here.
        """
        room = batcher.capacity - batcher.pending()
        while room > 0 and self._backlog:
            for key in list(self._backlog):
                queue = self._backlog[key]
                while queue and queue[0].done:
                    queue.popleft()
                if queue and room > 0:
                    seq = queue.popleft()
                    try:
                        batcher.add(SequenceRequest(seq.id, seq.spec.prompt, batch_params(seq.spec.params)))
                    except Exception as exc:  # noqa: BLE001 - the batcher refused it: fail this request only
                        self._refuse(seq, exc)
                    else:
                        self._live[seq.id] = seq
                        room -= 1
                if not queue:
                    del self._backlog[key]

    def _cancel_stalled(self) -> None:
        """Cancel the requests whose reader stopped reading (see `stall_timeout`)."""
        if not self._live or self.stall_timeout <= 0:
            return
        now = time.monotonic()
        subs = {id(seq.sub): seq.sub for seq in self._live.values()}.values()
        for sub in subs:
            if sub.delivered > sub.taken and now - sub.read_at > self.stall_timeout:
                log.warning("cancelling a request whose client stopped reading for %ss", self.stall_timeout)
                unfinished = [seq for seq in sub.sequences if not seq.done]
                for seq in unfinished:
                    if self._live.pop(seq.id, None) is not None:
                        self._batcher.cancel(seq.id)
                with self._cv:
                    self._release(unfinished)
                _call_soon(sub.loop, sub.queue.put_nowait, EngineFailure(
                    f"cancelled: the client read nothing for {self.stall_timeout:g} s"))

    def _gather(self, batcher) -> None:
        """Before a new batch starts, wait briefly for the clients of the batch that just ended.

        Only for a batcher that runs one group at a time (`StaticBatcher`). Closed-loop
        clients come back a few milliseconds after their last token. Without this pause
        such a batcher would start a small group
        with whoever is waiting and make the returning clients wait for all of it;
        the groups would never merge again. So when the previous batch ended less than
        `batch_wait` ago and had more sequences in flight than are waiting now, wait
        (at most `batch_wait`) until that many are back. An idle server starts at once.
        Called with the lock held.
        """
        if self.batch_wait <= 0 or time.monotonic() - self._ended_at > self.batch_wait:
            return
        target = min(self._last_peak, self.max_batch_size)
        deadline = time.monotonic() + self.batch_wait
        while len(self._intake) + sum(map(len, self._backlog.values())) + batcher.pending() < target and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)

    def _run_call(self, fn, fut, loop) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            result, error = None, exc
        with self._cv:
            self._admitted -= 1
            self._cv.notify_all()

        def settle():
            if fut.cancelled():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        loop.call_soon_threadsafe(settle)

    def _deliver(self, events) -> None:
        if not events:
            return
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        finished: list[_Sequence] = []
        ttfts: list[float] = []
        for event in events:
            seq = self._live.get(event.seq)
            if seq is None:  # cancelled while the step ran
                continue
            if not seq.started:
                seq.started = True
                if seq.sub.first_token_at is None:
                    seq.sub.first_token_at = now
                    ttfts.append(now - seq.sub.created)
            text, reason = seq.text.step(event.token_id, event.finish_reason)
            if seq.text.stopped:
                self._batcher.cancel(seq.id)
            if reason is not None:
                finished.append(seq)
                del self._live[seq.id]
            out = Output(seq.index, event.token_id, event.logprob, text, reason, event.top)
            seq.sub.delivered += 1
            batches.setdefault(seq.sub.loop, []).append((seq.sub.queue, out))
        if finished:
            with self._cv:
                self._release(finished)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(events))
            self.metrics.batch_size.observe(len(events))
            for t in ttfts:
                self.metrics.ttft.observe(t)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed (shutdown); nobody is listening
                pass

    def _refuse(self, seq: _Sequence, exc: Exception) -> None:
        log.error("a sequence failed (the others go on): %s", exc)
        self._fail_sequence(seq, EngineFailure(f"generation failed for this request: {exc}"))

    def _fail_sequence(self, seq: _Sequence, exc: BaseException) -> None:
        """Fail one sequence's request (its other sequences are cancelled by the handler)."""
        with self._cv:
            self._release([seq])
        _call_soon(seq.sub.loop, seq.sub.queue.put_nowait, exc)

    def _fail_lost(self) -> None:
        lost = list(self._live.values())
        self._live.clear()
        exc = EngineFailure("the batcher ended a sequence without a finish reason")
        log.error("%d sequences lost by the batcher", len(lost))
        with self._cv:
            self._release(lost)
        _fail_requests(lost, exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every admitted sequence and pending call (the thread is stopping or the batcher broke)."""
        with self._cv:
            waiting = [s for queue in self._backlog.values() for s in queue if not s.done]
            seqs = list(self._live.values()) + waiting + [s for s in self._intake if not s.done]
            calls = self._calls
            self._live.clear()
            self._backlog.clear()
            self._intake, self._calls = [], []
            self._admitted -= len(calls)
            self._release(seqs)
        _fail_requests(seqs, exc)
        for _fn, fut, loop in calls:
            _call_soon(loop, lambda f=fut: f.cancelled() or f.set_exception(exc))

    def _release(self, seqs: list[_Sequence]) -> None:
        """Mark `seqs` done, freeing their places (each once). Call with `_cv` held."""
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._admitted -= 1
        self._cv.notify_all()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self._running)
            self.metrics.queue_depth.set(max(self._admitted - self._running, 0))


def _lower_priority(steps: int) -> None:
    """Lower the calling thread's CPU priority by `steps` nice levels (Linux only; best effort)."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + steps)
    except OSError as exc:
        log.warning("could not lower the engine thread's priority: %s", exc)


def _fail_requests(seqs: list[_Sequence], exc: BaseException) -> None:
    """Hand `exc` to the request of each of `seqs`, once per request."""
    for sub in {id(seq.sub): seq.sub for seq in seqs}.values():
        _call_soon(sub.loop, sub.queue.put_nowait, exc)


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _call_soon(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass
