"""Intervals over replicates and the paired test of the claims table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from notbugs.stats import mcnemar_exact, mcnemar_greater, mean_interval, paired_comparison


def test_interval_covers_the_true_mean_of_simulated_binomial_replicates():
    """Replicates: 3 models whose test accuracy is Binomial(1000, p)/1000 plus seed noise."""
    rng = np.random.default_rng(0)
    truth, covered = 0.7, 0
    for _ in range(100):
        p = np.clip(truth + rng.normal(0, 0.02, size=3), 0, 1)  # seed-to-seed variation
        accuracies = rng.binomial(1000, p) / 1000
        interval = mean_interval(accuracies)
        covered += interval["ci_low"] <= truth <= interval["ci_high"]
    assert covered >= 93


def test_interval_of_known_values():
    out = mean_interval([1.0, 2.0, 3.0])
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert out["mean"] == 2.0 and out["sd"] == pytest.approx(1.0)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((2 - half, 2 + half))
    single = mean_interval([5.0])
    assert single["mean"] == 5.0 and math.isnan(single["sd"]) and math.isnan(single["ci_low"])


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 2), (12, 30), (50, 50), (1, 40)])
def test_mcnemar_equals_scipy_and_brute_force(b, c):
    n = b + c
    expected = 1.0 if n == 0 else scipy_stats.binomtest(b, n, 0.5).pvalue
    brute = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(b, c) == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 2), (12, 30), (50, 50), (1, 40), (40, 1)])
def test_one_sided_mcnemar_equals_scipy_and_brute_force(b, c):
    n = b + c
    expected = 1.0 if n == 0 else scipy_stats.binomtest(b, n, 0.5, alternative="greater").pvalue
    brute = 1.0 if n == 0 else sum(math.comb(n, i) for i in range(b, n + 1)) / 2 ** n
    assert mcnemar_greater(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_greater(b, c) == pytest.approx(brute, rel=1e-9)


def test_a_pair_that_favours_the_control_fails_the_every_pair_test():
    """Two pairs where A clearly beats B and one where B clearly beats A: the two-sided test of
    each pair is small for all three, but the claim 'A beats B on every pair' does not hold."""
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 500)) < 0.5, rng.random((3, 500)) < 0.5
    a[:2, :200], b[:2, :200] = True, False  # pairs 1 and 2 favour A
    a[2, :200], b[2, :200] = False, True  # pair 3 favours B
    out = paired_comparison(a, b)
    only_a, only_b = (a & ~b).sum(1), (~a & b).sum(1)
    assert max(mcnemar_exact(int(x), int(y)) for x, y in zip(only_a, only_b)) < 1e-6
    assert out["worst_replicate_p"] > 0.99


def test_paired_comparison_on_a_small_table():
    a = np.array([[1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], dtype=bool)
    b = np.array([[1, 0, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]], dtype=bool)
    out = paired_comparison(a, b)
    # pair 1: A-only rights at 1,2,5 (3), B-only none; pair 2: A-only 1,5 (2), B-only 3 (1)
    assert (out["only_better_right"], out["only_worse_right"]) == (5, 1)
    # averaged over pairs, examples 1, 2, 5 favour A and example 3 favours B: a sign test of 3 vs 1
    assert (out["examples_favour_better"], out["examples_favour_worse"]) == (3, 1)
    assert out["p_value"] == pytest.approx(scipy_stats.binomtest(3, 4, 0.5).pvalue)
    assert out["worst_replicate_p"] == pytest.approx(max(mcnemar_greater(3, 0), mcnemar_greater(2, 1)))
    assert out["diff"] == pytest.approx(100 * np.mean([3 / 6, 1 / 6]))
    assert out["replicates"] == 2 and out["n_examples"] == 6
    with pytest.raises(ValueError, match="same replicates"):
        paired_comparison(a, b[:1])
