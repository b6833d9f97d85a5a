"""Confidence intervals of word error rates.

Utterances, not words, are the independent units (a misheard utterance
costs several words), so one run's interval is a bootstrap over utterances
(:func:`bootstrap_wer`), two runs on the same utterances are compared with a
paired bootstrap (:func:`paired_difference`), and seeds get a Student-t
interval of their mean (:func:`mean_ci`), which includes the training noise.

Example
-------
>>> errors, words = [0, 1, 0, 2, 0, 0, 1, 0], [5, 4, 6, 5, 4, 6, 5, 5]
>>> est = bootstrap_wer(errors, words, resamples=2000, seed=0)
>>> round(est.value, 2), est.low < est.value < est.high
(10.0, True)
>>> m = mean_ci([20.0, 22.0, 24.0])
>>> round(m.value, 1), round(m.half_width, 2)
(22.0, 4.97)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_wer", "mean_ci", "paired_difference"]

#: Enough that the 2.5 % quantiles move by well under 0.1 point between seeds.
RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """An estimate (WER or WER difference, in points) with its interval, its
    standard error ``se`` and the ``n`` utterances or seeds it is over.
    """

    value: float
    low: float
    high: float
    se: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the interval."""
        return self.low <= value <= self.high

    def overlaps(self, other: Interval) -> bool:
        """Whether the two intervals share a point."""
        return self.low <= other.high and other.low <= self.high

    def format(self, digits: int = 2) -> str:
        """``12.34 % [11.50, 13.20]``, with ``digits`` decimals."""
        return (
            f"{self.value:.{digits}f} % [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        )


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    # How often each utterance is drawn in each replicate (resamples x n).
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _percentile_interval(
    estimate: float, replicates: np.ndarray, confidence: float, n: int
) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return Interval(
        float(estimate), float(low), float(high), float(replicates.std(ddof=1)), n
    )


def _per_utterance(*columns: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per-utterance counts as float64 arrays; the last column is the words."""
    arrays = tuple(np.asarray(c, dtype=np.float64) for c in columns)
    shape, words = arrays[0].shape, arrays[-1]
    if any(a.shape != shape for a in arrays) or words.size == 0 or words.sum() <= 0:
        raise ValueError("need matching, non-empty errors and words with words > 0")
    return arrays


def _wer_interval(
    edits: np.ndarray, words: np.ndarray, confidence: float, resamples: int, seed: int
) -> Interval:
    """``100 * sum(edits) / sum(words)``; percentile bootstrap over utterances."""
    counts = _resample_counts(edits.size, resamples, seed)
    replicates = 100 * (counts @ edits) / np.maximum(counts @ words, 1)
    estimate = 100 * edits.sum() / words.sum()
    return _percentile_interval(estimate, replicates, confidence, edits.size)


def bootstrap_wer(
    errors: Sequence[int],
    words: Sequence[int],
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """WER of one run with a percentile bootstrap interval over utterances.

    Arguments
    ---------
    errors, words : sequence of int
        Word edits and reference words per utterance.
    confidence, resamples, seed
        Coverage, bootstrap replicates and seed of the resampling.

    Returns
    -------
    Interval
        WER in %, over ``n`` utterances.

    Example
    -------
    >>> bootstrap_wer([1] * 10, [10] * 10).format()
    '10.00 % [10.00, 10.00]'
    """
    e, w = _per_utterance(errors, words)
    return _wer_interval(e, w, confidence, resamples, seed)


def paired_difference(
    errors_a: Sequence[int],
    errors_b: Sequence[int],
    words: Sequence[int],
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """WER of B minus WER of A on the same utterances, by a paired bootstrap.

    Arguments
    ---------
    errors_a, errors_b : sequence of int
        Edits per utterance of the two runs, in the same utterance order.
    words : sequence of int
        Reference words per utterance.
    confidence, resamples, seed
        As for :func:`bootstrap_wer`.

    Example
    -------
    >>> d = paired_difference([1, 0, 1, 0], [1, 0, 1, 0], [5, 5, 5, 5])
    >>> d.value, d.contains(0.0)
    (0.0, True)
    """
    a, b, w = _per_utterance(errors_a, errors_b, words)
    return _wer_interval(b - a, w, confidence, resamples, seed)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over seeds with a Student-t interval (NaN bounds for one value).

    Example
    -------
    >>> mean_ci([5.0]).format()
    '5.00 % [nan, nan]'
    """
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(t.ppf(0.5 + confidence / 2, x.size - 1)) * se
    return Interval(mean, mean - half, mean + half, se, int(x.size))
