"""The backend interface: what a backend plugin implements, built-in or third-party.

A backend is registered through the `register_backends` hook. It must be cheap to
create and to ask `unavailable_reason()` (no torch import at registration); `load`
does the heavy work and returns a `LoadedModel`.

A `LoadedModel` implements two token-level methods, `generate_tokens` and `score`;
the text layer (`generate`: UTF-8-safe text deltas, stop strings, `<NL>`) is shared
and comes for free, and so does `score_from` (scores of the last tokens only), which a
backend may override to skip the work for context-only positions.

The value types a plugin needs (`GenerationParams`, `TokenEvent`, `TokenScores`,
`LoadOptions`, ...) live in `toolbox.types` and are importable from here too.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolbox.errors import ToolboxError
from toolbox.streaming import TextAssembler
from toolbox.tokenizer import Tokenizer
from toolbox.types import Event, GenerationParams, LoadOptions, TokenEvent, TokenScores, TokenStream

__all__ = [
    "Backend", "BackendOption", "Event", "GenerationParams", "LoadOptions", "LoadedModel", "TokenEvent",
    "TokenScores", "TokenStream",
]


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

    def score_top(self, sequences: list[list[int]], first: list[int], k: int) -> list[TokenScores]:
        """`score_from` with `TokenScores.top` filled: the k most likely tokens at each scored
        position, with their log-probabilities (optional: OpenAI's `top_logprobs`)."""
        raise ToolboxError(f"the {type(self).__name__} backend does not report top log-probabilities")

    def describe(self) -> dict:
        """Facts worth showing the user: device, dtype, memory."""
        return {}

    def batcher(self, capacity: int):
        """A request-level batcher for the server (`toolbox.types.Batcher`).

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
                delta, reason = text.step(t.token_id, t.finish_reason)
                if text.stopped:
                    stream.cancel(t.seq)
                yield Event(t.seq, t.seq // params.n, t.token_id, t.logprob, delta, reason, t.top)


@dataclass(frozen=True)
class BackendOption:
    """A backend's own setting: `-o NAME=VALUE` on the command line, `options={NAME: value}`
    in `toolbox.load`, else the environment variable `env`, else `default`."""

    name: str
    help: str
    env: str | None = None
    default: str | None = None


class Backend(ABC):
    """A way to run the model (a device, a precision, a kernel library)."""

    name: str
    description: str = ""
    options: tuple[BackendOption, ...] = ()

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else a short reason (e.g. "no CUDA device")."""
        return None

    @abstractmethod
    def load(self, checkpoint: Path, options: LoadOptions) -> LoadedModel:
        """Load the checkpoint directory (config.json, weights, spiece.model)."""

    def check_options(self, extra: dict) -> None:
        """Refuse option names this backend does not declare (a typo must not be ignored)."""
        known = {o.name for o in self.options}
        for key in extra:
            if key not in known:
                offer = f"its options: {', '.join(sorted(known))}" if known else "it takes none"
                raise ToolboxError(f"option {key!r}: backend {self.name!r} has no such option ({offer})")

    def setting(self, options: LoadOptions, name: str) -> tuple[str | None, str]:
        """The value of option `name` and where it came from ("option NAME", the env var, or "default")."""
        declared = next(o for o in self.options if o.name == name)
        value = options.extra.get(name)
        if value is not None:
            return str(value) if not isinstance(value, bool) else ("1" if value else "0"), f"option {name}"
        if declared.env and os.environ.get(declared.env, "") != "":
            return os.environ[declared.env], declared.env
        return declared.default, "default"

    def flag(self, options: LoadOptions, name: str) -> bool:
        """A boolean option (1/0, true/false, yes/no, on/off); a one-line error names its source."""
        value, source = self.setting(options, name)
        v = (value or "").strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise ToolboxError(f"{source}: expected a boolean (1/0, true/false), got {value!r}")
