"""WER intervals: bootstrap over utterances, paired differences, seeds."""

import numpy as np
import pytest

from speechbrain_omc.asr.stats import (
    _resample_counts,
    bootstrap_wer,
    mean_ci,
    paired_difference,
)


def corpus(seed=0, n=200):
    rng = np.random.default_rng(seed)
    words = rng.integers(3, 15, n)
    return rng.binomial(words, 0.2), rng.binomial(words, 0.25), words


def test_bootstrap_wer_is_the_ratio_of_sums_resampled_by_utterance():
    errors, _, words = corpus()
    interval = bootstrap_wer(errors, words, resamples=500, seed=3)
    assert interval.value == pytest.approx(100 * errors.sum() / words.sum())
    assert interval.low < interval.value < interval.high
    # The same replicates drawn one utterance list at a time.
    counts = _resample_counts(len(words), 500, 3)
    brute = [
        100 * np.repeat(errors, c).sum() / np.repeat(words, c).sum() for c in counts
    ]
    low, high = np.quantile(brute, [0.025, 0.975])
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert interval.se == pytest.approx(np.std(brute, ddof=1))


def test_paired_difference_is_b_minus_a_on_the_same_resamples():
    a, b, words = corpus(1)
    d = paired_difference(a, b, words, resamples=500, seed=4)
    wer_a = bootstrap_wer(a, words, resamples=500, seed=4)
    wer_b = bootstrap_wer(b, words, resamples=500, seed=4)
    assert d.value == pytest.approx(wer_b.value - wer_a.value)
    assert d.high - d.low < (wer_a.high - wer_a.low) + (wer_b.high - wer_b.low)
    same = paired_difference(a, a, words)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "errors,words",
    [([1, 2], [3]), ([], []), ([0, 0], [0, 0])],
    ids=["mismatched", "empty", "no words"],
)
def test_bad_counts_are_refused(errors, words):
    with pytest.raises(ValueError, match="matching, non-empty"):
        bootstrap_wer(errors, words)
    with pytest.raises(ValueError, match="matching, non-empty"):
        paired_difference(errors, errors, words)


def test_mean_over_seeds_has_a_student_t_interval():
    interval = mean_ci([25.0, 23.0, 27.0])
    assert interval.value == 25.0
    # t(0.975, 2 d.o.f.) = 4.303, standard error 2 / sqrt(3)
    assert interval.high - interval.value == pytest.approx(4.303 * 2 / 3**0.5, 1e-3)
