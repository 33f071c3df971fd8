"""The tables stage: Table 1's significance column, Figure 2's rows, the models table."""

import math

import h5py
import numpy as np
import pandas as pd
import pytest

from notbugs import references
from notbugs.stats import paired_comparison
from notbugs.tables import binomial_tail, claims, figure2, models_table, table1


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


def test_table1_reports_replicates_and_a_conservative_p_value_against_chance():
    models = pd.DataFrame({"model": ["targets/d_rand/m/r1", "targets/d_rand/m/r2", "targets/d_det/m/r1"],
                           "group": ["targets/d_rand/m", "targets/d_rand/m", "targets/d_det/m"],
                           "replicate": [1, 2, 1], "kind": "target", "train_set": ["d_rand", "d_rand", "d_det"],
                           "arch": "m", "std_acc": [12.5, 14.0, 10.0], "construction_success_rate": [90.0, 90.0, 80.0],
                           "n_test": 2000, "train_fit": [99.0, 98.0, 97.0]})
    out = table1(models, 10).set_index("train_set")
    assert out.loc["d_rand", "replicates"] == 2 and out.loc["d_rand", "test_acc"] == pytest.approx(13.25)
    assert out.loc["d_rand", "test_acc_replicates"] == "12.5;14"
    # the test of the weakest replicate
    assert out.loc["d_rand", "p_above_chance"] == pytest.approx(binomial_tail(250, 2000, 0.1))
    assert out.loc["d_rand", "p_above_chance"] < 0.01 < out.loc["d_det", "p_above_chance"]
    assert list(out.index) == ["d_rand", "d_det"]


def _metrics(std, robust):
    return {"std_acc": std, "n_test": 100, "arch": "m", "adversarial": None, "train_seconds": 1.0, "train_fit": 0.99,
            "robust": [{"eps": eps, "robust_acc": acc, "norm": "l2", "steps": 2, "step_size": 0.1, "restarts": 1}
                       for eps, acc in robust.items()]}


def test_models_table_has_one_row_per_model_with_percentages():
    metrics = {"sources/s": _metrics(0.9, {0.25: 0.1}), "targets/d_det/m/r1": _metrics(0.5, {0.25: 0.0})}
    models = models_table(metrics, {"d_det": {"success_rate": 0.75, "mean_perturbation_norm": 0.4}})
    row = models.set_index("model").loc["targets/d_det/m/r1"]
    assert row["group"] == "targets/d_det/m" and row["replicate"] == 1
    assert row["kind"] == "target" and row["train_set"] == "d_det" and row["std_acc"] == 50.0
    assert row["robust_acc_eps0.25"] == 0.0 and row["construction_success_rate"] == 75.0
    assert models.set_index("model").loc["sources/s", "train_set"] == "d"


def test_figure2_reads_the_configured_radius_and_the_paper_values():
    metrics = {"targets/d_r/m/r1": _metrics(0.6, {0.25: 0.4, 0.5: 0.2}),
               "targets/d_r/m/r2": _metrics(0.6, {0.25: 0.4, 0.5: 0.2})}
    models = models_table(metrics, {})
    for eps, robust in ((0.25, 40.0), (0.5, 20.0)):
        row = figure2(models, {"standard_on_d_r": "targets/d_r/m"}, eps).iloc[0]
        assert row["robust_acc"] == robust and row["eps"] == eps and row["replicates"] == 2
        assert row["robust_acc_sd"] == 0 and row["robust_acc_replicates"] == f"{robust:g};{robust:g}"
        assert row["paper_std_acc"] == references.FIGURE2["standard_on_d_r"][0].value
    with pytest.raises(ValueError, match="no robust accuracy at eps=1"):
        figure2(models, {"standard_on_d_r": "targets/d_r/m"}, 1.0)


def test_table1_orders_sets_and_takes_reference_values():
    models = models_table({f"targets/{s}/m/r1": _metrics(0.3, {0.25: 0.0}) for s in ("d_det", "d", "d_rand")}, {})
    out = table1(models, 10)
    assert list(out.train_set) == ["d", "d_rand", "d_det"]
    assert (out.train_fit == 99.0).all()
    assert list(out.paper_test_acc) == [references.TABLE1[s].value for s in out.train_set]


def test_claims_pair_replicate_k_with_replicate_k():
    metrics = {f"targets/{s}/m/r{k}": _metrics(0.5, {0.25: 0.1}) for s in ("a", "b") for k in (1, 2)}
    models = models_table(metrics, {})
    rng = np.random.default_rng(0)
    per_model = {m: rng.random(200) < (0.8 if "/a/" in m else 0.5) for m in metrics}
    seen = []

    def correct(model_dir, metric):
        seen.append((model_dir, metric))
        return per_model[model_dir]

    out = claims(models, [{"better": "a", "worse": "b", "metric": "robust"}], 0.25, correct).iloc[0]
    a = np.stack([per_model["targets/a/m/r1"], per_model["targets/a/m/r2"]])
    b = np.stack([per_model["targets/b/m/r1"], per_model["targets/b/m/r2"]])
    expected = paired_comparison(a, b)
    assert out["p_value"] == pytest.approx(expected["p_value"]) and out["diff"] == pytest.approx(expected["diff"])
    assert out["metric"] == "robust" and out["eps"] == 0.25 and out["replicates"] == 2
    assert {m for m, _ in seen} == set(metrics) and {k for _, k in seen} == {"robust"}


def test_figure2_autoattack_runs_on_a_balanced_subset_of_the_test_images(tmp_path):
    """The plumbing: a subset of the test split, the attack recorded, PGD's rows matched. (That
    AutoAttack is no weaker than PGD where it matters: tests/test_attacks.py. At eps 1 nearly
    every image breaks at once, which keeps AutoAttack's later stages short.)"""
    import torch

    from helpers import make_data_artifact, train_tiny_model
    from notbugs.config import autoattack_config, complete
    from notbugs.evaluate import evaluate_checkpoint
    from notbugs.tables import autoattack_columns, correct_per_example, test_rows
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=300, n_test=100)
    model = train_tiny_model(data_path, tmp_path / "m", epochs=3)
    eval_cfg = complete("evaluation", {"eps": [1.0], "figure2_autoattack": {"n_test": 20}})
    fast = complete("fast_paths", {})
    evaluate_checkpoint(model, data_path, eval_cfg, tmp_path / "metrics.json", device=torch.device("cpu"), seed=0,
                        fast=fast, predictions=tmp_path / "predictions.h5")
    strong = autoattack_config(eval_cfg, 1.0)
    result = evaluate_checkpoint(model, data_path, strong, tmp_path / "autoattack.json", device=torch.device("cpu"),
                                 seed=0, fast=fast, predictions=tmp_path / "autoattack_predictions.h5")
    assert result["n_test"] == 20 and result["robust"][0]["attack"] == "autoattack"
    rows = test_rows(tmp_path / "autoattack_predictions.h5")
    autoattack = correct_per_example(tmp_path / "autoattack_predictions.h5", "robust", 1.0)
    pgd = correct_per_example(tmp_path / "predictions.h5", "robust", 1.0)[rows]
    assert len(autoattack) == 20 and autoattack.mean() <= pgd.mean()
    with h5py.File(tmp_path / "predictions.h5") as full, h5py.File(tmp_path / "autoattack_predictions.h5") as sub:
        np.testing.assert_array_equal(sub["test/labels"][:], full["test/labels"][:][rows])  # the same images
        assert (np.bincount(sub["test/labels"][:], minlength=10) == 2).all()  # class-balanced, not a prefix
    members = pd.DataFrame({"autoattack_n_test": [40, 40], "robust_acc_autoattack": [10.0, 20.0],
                            "robust_acc_pgd_same_images": [12.0, 24.0]})
    columns = autoattack_columns(members)
    assert columns["autoattack_n_test"] == 40 and columns["robust_acc_autoattack"] == pytest.approx(15.0)
    assert columns["robust_acc_pgd_same_images_replicates"] == "12;24"
    assert autoattack_columns(members.drop(columns="robust_acc_autoattack")) == {}


def test_summary_lists_every_bar_row_and_claim_with_intervals():
    from notbugs.tables import summary_markdown
    fig2 = pd.DataFrame([{"label": "standard_on_d_r", "model": "targets/d_r/m", "replicates": 3, "std_acc": 70.0,
                          "std_acc_ci_low": 60.0, "std_acc_ci_high": 80.0, "robust_acc": 50.0,
                          "robust_acc_ci_low": 40.0, "robust_acc_ci_high": 60.0},
                         {"label": "adversarial_on_d", "model": "sources/robust", "replicates": 1, "std_acc": 69.3,
                          "std_acc_ci_low": float("nan"), "std_acc_ci_high": float("nan"), "robust_acc": 60.0,
                          "robust_acc_ci_low": float("nan"), "robust_acc_ci_high": float("nan")}])
    t1 = pd.DataFrame([{"train_set": "d_rand", "arch": "m", "eps": 0.5, "replicates": 3, "test_acc": 30.0,
                        "test_acc_ci_low": 25.0, "test_acc_ci_high": 35.0, "train_fit": 99.0, "paper_test_acc": 63.3,
                        "paper_origin": "paper", "train_rows": 6266, "construction_success_rate": 62.7}])
    cl = pd.DataFrame([{"better": "d_rand", "worse": "d_leak_rand", "arch": "m", "metric": "clean", "diff": 5.0,
                        "diff_ci_low": 1.0, "diff_ci_high": 9.0, "p_value": 1e-5, "worst_replicate_p": 0.003}])
    text = summary_markdown(fig2, t1, cl, dataset="x", description="JPEG copy", eps=0.25)
    assert "| standard_on_d_r (targets/d_r/m) | 3 | 70.0 [60.0, 80.0] | 50.0 [40.0, 60.0] |" in text
    assert "| adversarial_on_d (sources/robust) | 1 | 69.3 | 60.0 |" in text  # one model: no interval
    assert "| d_rand | 6,266 | 62.7 | m | 0.5 | 3 | 30.0 [25.0, 35.0] | 99.0 | 63.3 (paper) |" in text
    assert "| d_rand > d_leak_rand (m) | clean | +5.0 [1.0, 9.0] | 1e-05 | 0.003 |" in text
    assert "JPEG copy" in text and "eps = 0.25" in text
