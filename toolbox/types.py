"""Plain value types shared by every layer: generation settings, token events, scores.

Nothing here imports torch, click or any other part of the toolbox, so the library,
the backends (built-in or third-party), the runtime and the server all speak the same
types without depending on each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LoadOptions:
    """How to load: device ("cpu", "cuda", "cuda:1"), dtype name, CPU threads, backend options.

    `extra` holds the backend's own options by name (`-o KEY=VALUE` on the command line,
    `options={...}` in `toolbox.load`); see `Backend.options`. `workload` is the caller's
    hint of what follows: "short" (one-shot commands), "generate" (long runs of generation:
    batch files, eval's generation tasks, serve), "score" (scoring files, log-likelihoods);
    a backend may spend seconds at load (compiling) where the run will earn them back.
    """

    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    extra: dict = field(default_factory=dict)
    workload: str = "short"


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping settings for one generate call (temperature 0 = greedy)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    top_logprobs: int = 0  # report the k most likely tokens at each step (`TokenEvent.top`)


@dataclass(frozen=True)
class TokenEvent:
    """One new token of sequence `seq` (= prompt_index * n + sample_index)."""

    seq: int
    token_id: int
    logprob: float  # log-probability of the token under the model (before sampling filters)
    finish_reason: str | None  # "stop" (EOS), "length", or None while running
    top: tuple[tuple[int, float], ...] | None = None  # with params.top_logprobs: (id, logprob), most likely first


@dataclass(frozen=True)
class TokenScores:
    """Scores of one sequence's tokens: entry k is for the k-th token scored (given all before it).

    `logprobs`: log p(token | tokens before it) in nats, from fp32 logits.
    `ranks`: 1 + the number of vocabulary entries with a strictly larger logit
    (1 = the model's most likely token; ties share the better rank).
    """

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]] | None = None  # from `LoadedModel.score_top`: (id, logprob) per token


class TokenStream(Protocol):
    """What `LoadedModel.generate_tokens` returns: iterate for the tokens of each step; `cancel` ends a sequence."""

    def __iter__(self) -> Iterator[list[TokenEvent]]: ...

    def cancel(self, seq: int) -> None: ...


@dataclass(frozen=True)
class Event:
    """A streamed generation event: a token with the text it completed."""

    seq: int
    prompt_index: int
    token_id: int
    logprob: float
    text: str  # text made final by this token ("" while a character's bytes are incomplete)
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None
    top: tuple[tuple[int, float], ...] | None = None  # the most likely tokens here, with params.top_logprobs


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence for a `Batcher`; `TokenEvent.seq` carries its `id`."""

    id: int
    prompt: list[int]
    params: GenerationParams


class Batcher(Protocol):
    """A request-level batcher, driven by one thread: `add` requests, `step` to advance every
    running request by one token, `cancel` the ones whose clients left.

    Optional members: `runs_groups` (True: one group at a time, not a continuous batch) and
    `take_refused() -> list[tuple[int, Exception]]`: the requests refused (by an `add` that
    defers its checks) or failed on their own (a row isolated from the rest) since the last
    call; they are gone from the batcher.
    """

    capacity: int

    def add(self, request: SequenceRequest) -> None: ...

    def cancel(self, request_id: int) -> None: ...

    def step(self) -> list[TokenEvent]: ...

    def pending(self) -> int:
        """Requests added and not yet finished or cancelled (running + waiting)."""
        ...

    def running(self) -> int:
        """Requests currently in the batch."""
        ...
