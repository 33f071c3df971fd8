"""The aggregated tables: Table 1's significance column."""

import math

import pandas as pd
import pytest

from notbugs.evaluate import binomial_tail, table1


def test_binomial_tail_exact_values():
    assert binomial_tail(10, 10, 0.5) == pytest.approx(1 / 1024)
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0
    assert binomial_tail(1, 5, 0.2) == pytest.approx(1 - 0.8 ** 5)
    by_hand = sum(math.comb(20, i) * 0.1 ** i * 0.9 ** (20 - i) for i in range(4, 21))
    assert binomial_tail(4, 20, 0.1) == pytest.approx(by_hand, rel=1e-12)


def test_binomial_tail_is_stable_for_large_n():
    # 2,000 test images against 10% chance: 11.75% is significant at 1%, 11% is not
    assert binomial_tail(235, 2000, 0.1) < 0.01 < binomial_tail(220, 2000, 0.1)
    assert 0 <= binomial_tail(1000, 2000, 0.1) < 1e-200  # may underflow to 0, never NaN or an error


def test_table1_reports_a_one_sided_p_value_against_chance():
    models = pd.DataFrame({"model": ["targets/d_rand/m", "targets/d_det/m"], "kind": ["target", "target"],
                           "train_set": ["d_rand", "d_det"], "arch": ["m", "m"], "std_acc": [12.5, 10.0],
                           "construction_success_rate": [90.0, 80.0], "n_test": [2000, 2000]})
    out = table1(models, 10).set_index("train_set")
    assert out.loc["d_rand", "p_above_chance"] == pytest.approx(binomial_tail(250, 2000, 0.1))
    assert out.loc["d_rand", "p_above_chance"] < 0.01 < out.loc["d_det", "p_above_chance"]
