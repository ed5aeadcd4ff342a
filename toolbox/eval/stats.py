"""Bootstrap confidence intervals, and the paired comparison of two runs on the same items.

Items are resampled with replacement and the corpus value recomputed on each sample (so
corpus BLEU is resampled as corpus BLEU, not as a mean of sentence scores); the interval is
the 2.5th and 97.5th percentile of those values. A paired comparison draws the same items
for both runs, which is what makes a small difference between two systems measurable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolbox.eval.metrics import Aggregate

RESAMPLES = 1000
CONFIDENCE = 0.95


def _samples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.nanpercentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int


def bootstrap(agg: Aggregate, rows: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """The corpus value of `rows` (items x k) with its bootstrap 95 % interval."""
    n = len(rows)
    value = agg.value(rows) if n else float("nan")
    if n < 2 or resamples < 1:
        return Estimate(value, float("nan"), float("nan"), n)
    low, high = _interval(agg.values(rows[_samples(n, resamples, seed)]))
    return Estimate(value, low, high, n)


@dataclass(frozen=True)
class Paired:
    a: float
    b: float
    diff: float  # b - a
    low: float
    high: float
    wins: int  # items where b did better than a
    ties: int
    losses: int
    n: int


def paired_bootstrap(agg: Aggregate, rows_a: np.ndarray, rows_b: np.ndarray, item_a, item_b,
                     resamples: int = RESAMPLES, seed: int = 0) -> Paired:
    """Run B against run A on the same items (rows aligned): difference B - A of the corpus value,
    its paired bootstrap 95 % interval, and per-item win/tie/loss from the item values (a win
    is B better: higher, or lower for a metric such as perplexity)."""
    n = len(rows_a)
    a, b = agg.value(rows_a), agg.value(rows_b)
    item_a, item_b = np.asarray(item_a, dtype=float), np.asarray(item_b, dtype=float)
    close = np.isclose(item_a, item_b, rtol=0, atol=1e-12, equal_nan=True)
    better, worse = (item_b > item_a, item_b < item_a) if agg.higher_is_better else (item_b < item_a, item_b > item_a)
    wins, losses = int((better & ~close).sum()), int((worse & ~close).sum())
    low = high = float("nan")
    if n >= 2 and resamples >= 1:
        idx = _samples(n, resamples, seed)
        diffs = np.asarray(agg.values(rows_b[idx])) - np.asarray(agg.values(rows_a[idx]))
        low, high = _interval(diffs)
    return Paired(a, b, b - a, low, high, wins, n - wins - losses, losses, n)
