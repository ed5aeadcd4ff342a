"""Scoring without torch: the sliding-window plan, document scoring through a
`LoadedModel`, the statistics, and the results `Model.score` / `Model.compare` return.

Window policy (docs/score.md has a worked example). A document's token sequence
(with the optional prefix token in front) of length L is cut into windows of at most
W tokens. Token 0 is never scored: it has no left context (it is the prefix token, or
the text's first token when there is no prefix).

* L <= W: one window [0, L) scores tokens 1 .. L-1.
* L > W: the first window [0, W) scores tokens 1 .. W-1; then each chunk of S new
  targets [a, b), b = min(a + S, L), is scored in the window [b - W, b).

So every token is scored exactly once; a token t of the first window sees all t
tokens before it, and any later token sees between W - S and W - 1 (the final
chunk, which may be shorter than S, still gets a full window).

Statistics (as llama.cpp's perplexity tool): with per-token negative log-likelihoods
x_1..x_N, m = mean(x), PPL = exp(m), and the standard error of the mean NLL
sqrt((mean(x^2) - m^2) / (N - 1)), carried to PPL by the delta method:
PPL +/- exp(m) * that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from toolbox.errors import ToolboxError
from toolbox.types import TokenScores


@dataclass(frozen=True)
class Window:
    """One model call: tokens [start, end) of the sequence, scoring targets [first, end)."""

    start: int
    first: int
    end: int

    @property
    def context(self) -> int:
        """Left context of the first target."""
        return self.first - self.start


def default_stride(window: int) -> int:
    """Half the window: every token after the first window keeps at least W/2 tokens of context."""
    return max(1, window // 2)


def check_window(window: int, stride: int) -> None:
    if window < 2:
        raise ValueError(f"window of {window} tokens: at least 2 are needed (a target and its context)")
    if not 1 <= stride < window:
        raise ValueError(f"stride {stride} must be between 1 and the window minus 1 ({window - 1})")


def plan_windows(length: int, window: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..length-1 of a sequence exactly once (see the module doc)."""
    check_window(window, stride)
    if length < 2:
        return []
    if length <= window:
        return [Window(0, 1, length)]
    plan = [Window(0, 1, window)]
    a = window
    while a < length:
        b = min(a + stride, length)
        plan.append(Window(b - window, a, b))
        a = b
    return plan


def window_count(length: int, window: int, stride: int) -> int:
    """len(plan_windows(...)) without building it."""
    if length < 2:
        return 0
    if length <= window:
        return 1
    return 1 + -(-(length - window) // stride)


# -- scoring documents ----------------------------------------------------------------


def score_documents(
    model,
    docs: Sequence[Sequence[int]],
    window: int,
    stride: int,
    prefix: int | None = None,
    chunk_tokens: int = 16384,
    progress: Callable[[int, float], None] | None = None,
) -> list[TokenScores]:
    """Score each document's tokens with `model.score_from` over its window plan.

    Returns one `TokenScores` per document covering the document's tokens 1..n-1, or
    all n of them when a `prefix` token id is put in front (the prefix itself is never
    scored). Windows of all documents are sent in calls of about `chunk_tokens`
    tokens, which the backend packs into batches; `progress(doc, fraction)` is called
    as each window of document `doc` is done (fraction = its share of the document).
    """
    seqs: list[list[int]] = []
    firsts: list[int] = []
    owners: list[int] = []
    shares: list[float] = []
    for d, ids in enumerate(docs):
        full = ([prefix] if prefix is not None else []) + list(ids)
        plan = plan_windows(len(full), window, stride)
        for w in plan:
            seqs.append(full[w.start : w.end])
            firsts.append(w.context)
            owners.append(d)
            shares.append(1.0 / len(plan))
    logprobs: list[list[float]] = [[] for _ in docs]
    ranks: list[list[int]] = [[] for _ in docs]
    i = 0
    while i < len(seqs):
        j, size = i, 0
        while j < len(seqs) and (j == i or size + len(seqs[j]) <= chunk_tokens):
            size += len(seqs[j])
            j += 1
        found = model.score_from(seqs[i:j], firsts[i:j])
        for k, got in zip(range(i, j), found):
            expected = len(seqs[k]) - firsts[k]
            if len(got.logprobs) != expected or len(got.ranks) != expected:
                raise RuntimeError(f"backend returned {len(got.logprobs)} scores for {expected} tokens")
            if any(lp != lp for lp in got.logprobs):  # NaN: no statistic computed from it would mean anything
                raise ToolboxError("the model produced NaN log-probabilities: its weights hold NaN or infinite "
                                   "values, or overflow in this dtype (try float32)")
            logprobs[owners[k]].extend(got.logprobs)
            ranks[owners[k]].extend(got.ranks)
            if progress is not None:
                progress(owners[k], shares[k])
        i = j
    return [TokenScores(lp, rk) for lp, rk in zip(logprobs, ranks)]


# -- statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Log-likelihood statistics of a set of scored tokens (one text, or the corpus)."""

    scored: int  # N, tokens scored
    logprob: float  # total log-likelihood, nats
    mean_nll: float | None  # -logprob / N
    ppl: float | None  # exp(mean_nll)
    nll_stderr: float | None  # standard error of mean_nll (None when N < 2)
    ppl_stderr: float | None  # ppl * nll_stderr

    def as_dict(self) -> dict:
        return {
            "scored": self.scored,
            "logprob": self.logprob,
            "mean_nll": self.mean_nll,
            "ppl": self.ppl,
            "nll_stderr": self.nll_stderr,
            "ppl_stderr": self.ppl_stderr,
        }


class Accumulator:
    """Running sums of per-token NLL (sum and sum of squares, in double) for `Stats`."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0  # sum of logprobs
        self.sumsq = 0.0  # sum of NLL^2

    def add(self, logprobs: Iterable[float]) -> None:
        for lp in logprobs:
            self.n += 1
            self.total += lp
            self.sumsq += lp * lp

    def stats(self) -> Stats:
        return stats_from_sums(self.n, self.total, self.sumsq)


def stats_from_sums(n: int, total: float, sumsq: float) -> Stats:
    """`Stats` from N, the sum of logprobs and the sum of squared NLLs (llama.cpp's formulas)."""
    if n == 0:
        return Stats(0, 0.0, None, None, None, None)
    m = -total / n
    ppl = _exp(m)
    if n < 2:
        return Stats(n, total, m, ppl, None, None)
    var = max(sumsq / n - m * m, 0.0)  # rounding can make a zero variance slightly negative
    se = math.sqrt(var / (n - 1))
    return Stats(n, total, m, ppl, se, ppl * se)


def text_stats(logprobs: Sequence[float]) -> Stats:
    acc = Accumulator()
    acc.add(logprobs)
    return acc.stats()


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class DiffAccumulator:
    """|logprob_A - logprob_B| over the same tokens, for --compare."""

    n: int = 0
    total: float = 0.0
    largest: float = 0.0

    def add(self, a: Sequence[float], b: Sequence[float]) -> None:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} and {len(b)} scores to compare")
        for x, y in zip(a, b):
            d = abs(x - y)
            self.n += 1
            self.total += d
            self.largest = max(self.largest, d)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


def mean_abs_diff(a: Sequence[float], b: Sequence[float]) -> float | None:
    acc = DiffAccumulator()
    acc.add(a, b)
    return acc.mean


# -- results ----------------------------------------------------------------------------


@dataclass
class TextScore:
    """One text's scores. `token_ids` are the text's tokens; entry k of `logprobs` / `ranks` is
    token ``scored_from + k`` given all before it (``scored_from`` is 1 without a prefix token:
    the first token has no context; 0 with one)."""

    text: str | None
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    scored_from: int
    stats: Stats

    @property
    def ppl(self) -> float | None:
        return self.stats.ppl


@dataclass
class Scores:
    """`Model.score`'s answer: each text's scores and the token-weighted corpus statistics."""

    texts: list[TextScore]
    corpus: Stats
    window: int
    stride: int
    prefix: str | None

    @property
    def ppl(self) -> float | None:
        return self.corpus.ppl


@dataclass
class Comparison:
    """`Model.compare`'s answer: both models' scores over the same tokens and how far they differ."""

    a: Scores
    b: Scores
    mean_abs_diff: float | None  # mean |logprob_a - logprob_b| over every scored token, nats
    max_abs_diff: float
    text_diffs: list[float | None]  # the same, per text
