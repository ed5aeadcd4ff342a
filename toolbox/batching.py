"""Request-level batching for the server: requests join and leave a running batch.

A `Batcher` is driven by one engine thread: `add` requests, call `step` to advance
every running request by one token, `cancel` the ones whose clients left. Each
request has its own `GenerationParams` (n = 1). The built-in runtime provides a
continuous batcher (a request joins at the next step); `StaticBatcher` is the
fallback for any backend: it runs groups of requests with identical settings
through `generate_tokens`, one group at a time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

from toolbox.backend import GenerationParams, LoadedModel, TokenEvent


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate; `TokenEvent.seq` carries its `id`."""

    id: int
    prompt: list[int]
    params: GenerationParams


class Batcher(Protocol):
    """What the server's engine thread drives."""

    capacity: int
    runs_groups: bool  # optional (default False): one group at a time, not a continuous batch
    # optional: a batcher whose `add` cannot refuse at once (it defers the work) offers
    # `take_refused() -> list[tuple[int, Exception]]`, the requests it refused since the last call

    def add(self, request: SequenceRequest) -> None: ...

    def cancel(self, request_id: int) -> None: ...

    def step(self) -> list[TokenEvent]: ...

    def pending(self) -> int:
        """Requests added and not yet finished or cancelled (running + waiting)."""
        ...

    def running(self) -> int:
        """Requests currently in the batch."""
        ...


class StaticBatcher:
    """Runs waiting requests in groups of equal settings through `generate_tokens`."""

    runs_groups = True  # one group at a time: the engine lets returning clients gather first

    def __init__(self, model: LoadedModel, capacity: int):
        self.model, self.capacity = model, capacity
        self._waiting: deque[SequenceRequest] = deque()
        self._group: list[SequenceRequest] = []
        self._stream = None
        self._steps = None

    def add(self, request: SequenceRequest) -> None:
        self._waiting.append(request)

    def cancel(self, request_id: int) -> None:
        self._waiting = deque(r for r in self._waiting if r.id != request_id)
        for seq, request in enumerate(self._group):
            if request.id == request_id:
                self._stream.cancel(seq)

    def pending(self) -> int:
        return len(self._waiting) + len(self._group)

    def running(self) -> int:
        return len(self._group)

    def _start_group(self) -> None:
        first = self._waiting[0]
        key = replace(first.params, seed=None)
        group = [r for r in self._waiting if replace(r.params, seed=None) == key][: self.capacity]
        if first.params.seed is not None:  # a seeded request runs alone, to stay reproducible
            group = [first]
        ids = {r.id for r in group}
        self._waiting = deque(r for r in self._waiting if r.id not in ids)
        self._stream = self.model.generate_tokens([r.prompt for r in group], replace(first.params, n=1))
        self._steps = iter(self._stream)
        self._group = group  # only once the group runs: a failed start leaves the batcher idle

    def step(self) -> list[TokenEvent]:
        if self._stream is None:
            if not self._waiting:
                return []
            self._start_group()
        try:
            events = next(self._steps)
        except StopIteration:
            self._stream = self._steps = None
            self._group = []
            return []
        return [replace(e, seq=self._group[e.seq].id) for e in events]
