"""The statistics behind every table: intervals over replicates and paired tests on per-example
predictions. Two sources of variation are kept apart: the test set is finite (binomial, handled
per example by the paired test) and training is random (seeds, handled by replicates)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, standard deviation and Student-t interval of replicate values (one model per seed).
    With a single replicate the sd and the interval are NaN: one run says nothing about seeds."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    sd = float(v.std(ddof=1))
    half = float(_scipy.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: ``b`` examples right only under A, ``c`` right only under B;
    under the null each discordant example is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * _scipy.binom.cdf(min(b, c), n, 0.5)))


def mcnemar_greater(b: int, c: int) -> float:
    """One-sided exact McNemar test that A beats B: the chance of ``b`` or more of the ``b + c``
    discordant examples going A's way if each were a fair coin. Near 1 when B is the better one."""
    n = b + c
    if n == 0:
        return 1.0
    return float(_scipy.binom.sf(b - 1, n, 0.5))


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Compare A with B on the same test examples, replicate k of A paired with replicate k of B.

    ``correct_a`` / ``correct_b``: boolean arrays (replicates × examples). Returns the accuracy
    difference A − B in points (mean and t-interval over replicate pairs); ``p_value``, an exact
    two-sided sign test across examples of each example's replicate-averaged difference (one
    vote per test image, since the replicates share the images); and ``worst_replicate_p``, the
    largest one-sided exact McNemar p-value (A better than B) over the single pairs: small only
    when A beats B on every pair, since a pair that favours B gives a p-value near 1."""
    a, b = np.atleast_2d(correct_a).astype(bool), np.atleast_2d(correct_b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same replicates and examples, got {a.shape} and {b.shape}")
    diffs = 100 * (a.mean(1) - b.mean(1))
    only_a = (a & ~b).sum(1)
    only_b = (~a & b).sum(1)
    per_example = a.mean(0) - b.mean(0)
    favour_a, favour_b = int((per_example > 0).sum()), int((per_example < 0).sum())
    interval = mean_interval(diffs)
    return {"replicates": len(a), "n_examples": a.shape[1], "diff": interval["mean"], "diff_sd": interval["sd"],
            "diff_ci_low": interval["ci_low"], "diff_ci_high": interval["ci_high"],
            "only_better_right": int(only_a.sum()), "only_worse_right": int(only_b.sum()),
            "examples_favour_better": favour_a, "examples_favour_worse": favour_b,
            "p_value": mcnemar_exact(favour_a, favour_b),
            "worst_replicate_p": max(mcnemar_greater(int(x), int(y)) for x, y in zip(only_a, only_b))}
