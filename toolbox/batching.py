"""`StaticBatcher`: the request-level batcher (`toolbox.types.Batcher`) any backend gets.

The server's engine drives a batcher: requests (each with its own `GenerationParams`,
n = 1) join and leave a running batch. The built-in runtime provides a continuous
batcher (a request joins at the next step); this fallback runs groups of requests with
identical settings through `LoadedModel.generate_tokens`, one group at a time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from toolbox.types import SequenceRequest, TokenEvent


class StaticBatcher:
    """Runs waiting requests in groups of equal settings through `generate_tokens`."""

    runs_groups = True  # one group at a time: the engine lets returning clients gather first

    def __init__(self, model, capacity: int):
        """`model`: a `toolbox.backend.LoadedModel`."""
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
