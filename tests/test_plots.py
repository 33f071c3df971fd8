"""Figures: every plot function writes a readable PNG and a PDF, also for empty tables."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from notbugs import plots


def _assert_figure(out_png):
    pdf = out_png.with_suffix(".pdf")
    assert out_png.stat().st_size > 5000 and pdf.stat().st_size > 1000
    image = imread(out_png)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.01, "the figure is not blank"


def test_figure2_and_table1(tmp_path):
    fig2 = pd.DataFrame({"label": ["standard_on_d", "standard_on_d_r"], "model": ["targets/d/a", "targets/d_r/a"],
                         "std_acc": [90.0, 70.0], "robust_acc": [0.0, 50.0], "eps": [0.25, 0.25],
                         "paper_std_acc": [95.3, 84.1], "paper_robust_acc": [4.5, float("nan")],
                         "paper_origin": ["paper", "paper"]})
    plots.figure2(fig2, tmp_path / "figure2.png")
    _assert_figure(tmp_path / "figure2.png")
    t1 = pd.DataFrame({"train_set": ["d", "d_det", "d_leak_det"], "arch": ["a"] * 3, "test_acc": [90.0, 45.0, 5.0],
                       "construction_success_rate": [float("nan"), 100.0, float("nan")], "n_test": [1000] * 3,
                       "chance": [10.0] * 3, "paper_test_acc": [95.3, 43.7, 32.3],
                       "paper_origin": ["paper", "paper", "replication"]})
    plots.table1(t1, tmp_path / "table1.png")
    _assert_figure(tmp_path / "table1.png")


@pytest.mark.parametrize("fn", [plots.figure2, plots.table1])
def test_empty_tables_still_give_a_figure(tmp_path, fn):
    fn(pd.DataFrame(), tmp_path / "empty.png")
    _assert_figure(tmp_path / "empty.png")


def test_amplified_difference_is_exact():
    original = np.full((1, 3, 2, 2), 0.5, dtype=np.float32)
    constructed = original.copy()
    constructed[0, 0, 0, 0] += 0.01
    constructed[0, 1, 0, 0] -= 0.2
    diff = plots.amplified_difference(original, constructed, amplify=10)
    assert diff[0, 0, 0, 0] == pytest.approx(0.6)
    assert diff[0, 1, 0, 0] == 0.0  # clipped
    assert diff[0, 2, 1, 1] == pytest.approx(0.5)
    uint8 = (original * 255).astype(np.uint8)
    assert plots.amplified_difference(uint8, uint8 / 255.0, amplify=10) == pytest.approx(0.5, abs=0.03)


def test_image_grid_training_curves_and_inspect_grid(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    constructed = np.clip(original / 255.0 + rng.normal(0, 0.01, original.shape), 0, 1).astype(np.float32)
    names = [f"c{i}" for i in range(10)]
    plots.image_grid(original, constructed, [0, 1, 2, 3], [1, 2, 3, 4], names, tmp_path / "grid.png", title="t")
    _assert_figure(tmp_path / "grid.png")
    log = pd.DataFrame({"epoch": [1, 2, 3], "lr": [0.1] * 3, "train_loss": [2.0, 1.0, 0.5],
                        "train_acc": [0.2, 0.6, 0.9], "seconds": [1, 2, 3]})
    plots.training_curves({"sources/a": log, "targets/d/a": log}, tmp_path / "curves.png")
    _assert_figure(tmp_path / "curves.png")
    plots.inspect_grid(original, [0, 1, 2, 3], names, tmp_path / "inspect.png", n=4)
    _assert_figure(tmp_path / "inspect.png")
