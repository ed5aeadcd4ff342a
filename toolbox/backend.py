"""The backend interface every plugin implements, and backend selection.

A backend is registered through the `register_backends` hook. It must be cheap to
create and to ask `unavailable_reason()` (no torch import at registration); `load`
does the heavy work and returns a `LoadedModel`.

A `LoadedModel` implements two token-level methods, `generate_tokens` and `score`;
the text layer (`generate`: UTF-8-safe text deltas, stop strings, `<NL>`) is shared
and comes for free, and so does `score_from` (scores of the last tokens only), which a
backend may override to skip the work for context-only positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from toolbox.errors import ToolboxError
from toolbox.streaming import TextAssembler
from toolbox.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadOptions:
    """How to load: device ("cpu", "cuda", "cuda:1"), dtype name, CPU threads, backend extras."""

    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def extra_flag(value, env_value, default: bool) -> bool:
    """A boolean backend option: `value` (from `LoadOptions.extra`), else `env_value` (the CLI's way), else `default`."""
    if value is None:
        value = env_value
    if value is None or value == "":
        return default
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")
    return bool(value)


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


@dataclass(frozen=True)
class TokenEvent:
    """One new token of sequence `seq` (= prompt_index * n + sample_index)."""

    seq: int
    token_id: int
    logprob: float  # log-probability of the token under the model (before sampling filters)
    finish_reason: str | None  # "stop" (EOS), "length", or None while running


@dataclass(frozen=True)
class TokenScores:
    """Scores of one sequence's tokens: entry k is for the k-th token scored (given all before it).

    `logprobs`: log p(token | tokens before it) in nats, from fp32 logits.
    `ranks`: 1 + the number of vocabulary entries with a strictly larger logit
    (1 = the model's most likely token; ties share the better rank).
    """

    logprobs: list[float]
    ranks: list[int]


class TokenStream(Protocol):
    """What `generate_tokens` returns: iterate for the tokens of each step; `cancel` ends a sequence."""

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


class LoadedModel(ABC):
    """A model ready to generate and score, as returned by `Backend.load`."""

    tokenizer: Tokenizer
    context_length: int

    @abstractmethod
    def generate_tokens(self, prompts: list[list[int]], params: GenerationParams) -> TokenStream:
        """Start generating for a ragged batch of prompts (each expanded to `params.n` samples)."""

    @abstractmethod
    def score(self, sequences: list[list[int]]) -> list[TokenScores]:
        """Log-probability and rank of each token given the ones before it.

        One `TokenScores` per sequence, with entries for tokens 1..len-1 (entry t-1 is
        token t given tokens < t; a sequence of 0 or 1 tokens gives empty lists).
        Raise `ToolboxError` for a sequence longer than `context_length`.
        """

    def score_from(self, sequences: list[list[int]], first: list[int]) -> list[TokenScores]:
        """Like `score`, but only tokens first[i]..len-1 of sequence i (entry k is token first[i]+k).

        The tokens before `first[i]` are context only (a sliding window's overlap). This
        default scores everything and slices; a backend may override it to skip the
        output layer for the context positions.
        """
        if len(first) != len(sequences):
            raise ValueError("score_from: one first index per sequence")
        out = []
        for seq, f, s in zip(sequences, first, self.score(sequences)):
            if not 1 <= f <= max(len(seq), 1):
                raise ValueError(f"score_from: first index {f} outside 1..{len(seq)}")
            out.append(TokenScores(list(s.logprobs[f - 1 :]), list(s.ranks[f - 1 :])))
        return out

    def describe(self) -> dict:
        """Facts worth showing the user: device, dtype, memory."""
        return {}

    def batcher(self, capacity: int):
        """A request-level batcher for the server (see `toolbox.batching`).

        The default runs groups of requests with equal settings through
        `generate_tokens`; a backend with continuous batching overrides this.
        """
        from toolbox.batching import StaticBatcher

        return StaticBatcher(self, capacity)

    def generate(self, prompts: list[list[int]], params: GenerationParams, nl: bool = False) -> Iterator[Event]:
        """Stream `Event`s: token ids, text deltas, logprobs and finish reasons."""
        stream = self.generate_tokens(prompts, params)
        texts: dict[int, TextAssembler] = {}
        for step in stream:
            for t in step:
                text = texts.setdefault(t.seq, TextAssembler(self.tokenizer.token_bytes, params.stop, nl))
                delta = text.push(t.token_id)
                reason = t.finish_reason
                if text.stopped:
                    stream.cancel(t.seq)
                    reason = "stop"
                elif reason is not None:
                    delta += text.finish()
                yield Event(t.seq, t.seq // params.n, t.token_id, t.logprob, delta, reason)


class Backend(ABC):
    """A way to run the model (a device, a precision, a kernel library)."""

    name: str
    description: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else a short reason (e.g. "no CUDA device")."""
        return None

    @abstractmethod
    def load(self, checkpoint: Path, options: LoadOptions) -> LoadedModel:
        """Load the checkpoint directory (config.json, weights, spiece.model)."""


def backends() -> dict[str, Backend]:
    """Every registered backend by name, in registration order."""
    from toolbox.plugins import hook_results

    found: dict[str, Backend] = {}
    for group in hook_results("register_backends"):
        for backend in group or ():
            found.setdefault(backend.name, backend)
    return found


AUTO_ORDER = ("cuda", "cpu")


def pick_backend(name: str = "auto") -> Backend:
    """The backend called `name`; "auto" means cuda when it is available, else cpu."""
    registered = backends()
    if not registered:
        raise ToolboxError("no backends are loaded (check TOOLBOX_PLUGINS and the installed plugins)")
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = registered.get(candidate)
            if backend is not None and backend.unavailable_reason() is None:
                return backend
        name = "cpu"
    backend = registered.get(name)
    usable = [n for n, b in registered.items() if b.unavailable_reason() is None]
    if backend is None:
        raise ToolboxError(f"unknown backend {name!r}; available: {', '.join(usable) or 'none'}")
    reason = backend.unavailable_reason()
    if reason is not None:
        raise ToolboxError(f"backend {name!r} is not available ({reason}); available: {', '.join(usable) or 'none'}")
    return backend
