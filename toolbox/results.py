"""What a generation returns: one place that collects a sequence's events into its result.

`Sample` accumulates one generated sequence (text, token ids, logprobs, finish reason,
timings) from the events the text layer emits; `Completion` is one prompt with its
samples. The Python API returns them, the CLI prints them, the server formats them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    """One generated sequence as it accumulates (`add` each event of it, in order)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)  # the text each token made final (offsets, streaming)
    tops: list = field(default_factory=list)  # with top_logprobs: each token's most likely (id, logprob) pairs
    finish_reason: str | None = None  # "stop", "length", or "error"
    error: str | None = None  # why, when finish_reason is "error"
    first_token_at: float | None = None  # time.perf_counter() of the first token
    done_at: float | None = None

    def add(self, token_id: int, logprob: float, text: str, finish_reason: str | None, top=None) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.text += text
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.deltas.append(text)
        if top is not None:
            self.tops.append(top)
        if finish_reason is not None:
            self.finish_reason, self.done_at = finish_reason, now

    def timings(self, started: float) -> dict:
        """Time to first token, total time and rates, from `started` (a perf_counter reading)."""
        first = self.first_token_at or started
        done = self.done_at or first
        total, decode = done - started, done - first
        count = len(self.token_ids)
        return {
            "time_to_first_token_s": round(first - started, 6),
            "total_s": round(total, 6),
            "tokens_per_s": round(count / total, 2) if total > 0 else None,
            "decode_tokens_per_s": round((count - 1) / decode, 2) if decode > 0 else None,
        }


@dataclass
class Completion:
    """One prompt's result: its samples (one unless n > 1); the first sample's fields are at hand."""

    prompt: str | None  # the prompt as given (None when given as token ids)
    prompt_ids: list[int]  # what the model saw (template applied, truncated if asked)
    samples: list[Sample]
    started: float = field(default_factory=time.perf_counter)

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def logprobs(self) -> list[float]:
        return self.samples[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason

    def __str__(self) -> str:
        return self.text
