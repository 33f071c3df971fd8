"""The plot stage: every figure writes a non-trivial PNG and PDF, also for empty inputs."""

from __future__ import annotations

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import REPO
from notbugs import plots

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
rng = np.random.default_rng(0)


def assert_figure(png) -> np.ndarray:
    """Both files exist and are non-trivial; returns the PNG's pixels."""
    pdf = png.with_suffix(".pdf")
    assert png.stat().st_size > 5_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1_000
    pixels = mpimg.imread(png)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.01, "the figure is blank"
    assert plt.get_fignums() == []  # closed after saving
    return pixels


def figure2_table() -> pd.DataFrame:
    return pd.DataFrame({
        "label": ["standard_on_d", "adversarial_on_d", "standard_on_d_r", "standard_on_d_nr", "custom"],
        "model": ["targets/d/small_cnn", "sources/robust", "targets/d_r/small_cnn", "targets/d_nr/small_cnn", "x"],
        "std_acc": [94.0, 88.0, 80.0, 86.0, 99.5], "robust_acc": [3.0, 79.0, 45.0, 0.5, np.nan], "eps": 0.25,
        "paper_std_acc": [95.3, 91.0, 84.1, 87.7, np.nan], "paper_robust_acc": [4.5, 82.5, 48.3, 0.8, np.nan],
        "paper_origin": ["paper", "paper (approx.)", "paper", "paper", ""]})


def table1_table(archs=("small_cnn",)) -> pd.DataFrame:
    sets = ["d", "d_rand", "d_det", "d_other", "d_leak_rand", "d_leak_det", "d_custom"]
    return pd.DataFrame([{
        "train_set": s, "arch": a, "test_acc": 90.0 - 10 * i + j, "n_test": 1000, "chance": 10.0,
        "construction_success_rate": np.nan if s == "d" else 99.0,
        "paper_test_acc": [95.3, 63.3, 43.7, 67.3, 79.5, 32.3, np.nan][i],
        "paper_origin": (["paper"] * 3 + ["replication"] * 3 + [""])[i]} for i, s in enumerate(sets)
        for j, a in enumerate(archs)])


def training_log(epochs: int = 5) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "lr": 0.1, "train_loss": 2.3 / e, "train_acc": 1 - 0.9 / e, "seconds": 1.0})


def overlapping_texts(fig) -> list:
    """Pairs of drawn texts whose boxes overlap by more than a pixel."""
    fig.canvas.draw()
    texts = [t for t in fig.findobj(plt.Text) if t.get_visible() and t.get_text().strip()]
    boxes = [t.get_window_extent().expanded(1, 1).padded(-1) for t in texts]
    return [(texts[i].get_text(), texts[j].get_text()) for i in range(len(texts)) for j in range(i + 1, len(texts))
            if boxes[i].overlaps(boxes[j])]


def texts_crossed_by_reference_markers(fig) -> list:
    """Texts that a reference marker (a horizontal segment drawn with ``hlines``) runs through."""
    fig.canvas.draw()
    crossed = []
    for ax in fig.axes:
        segments = [ax.transData.transform(seg) for coll in ax.collections if isinstance(coll, LineCollection)
                    for seg in coll.get_segments()]
        for text in ax.texts:
            box = text.get_window_extent()
            for (x0, y0), (x1, y1) in segments:
                if y0 == y1 and box.y0 < y0 < box.y1 and min(x0, x1) < box.x1 and max(x0, x1) > box.x0:
                    crossed.append(text.get_text())
    return crossed


def capture_figure(monkeypatch, check_overlaps: bool = False) -> list:
    """Record the texts of the figure passed to ``plots._save``; optionally assert none overlap."""
    figures, save = [], plots._save

    def recording_save(fig, out_png):
        if check_overlaps:
            assert overlapping_texts(fig) == []
            assert texts_crossed_by_reference_markers(fig) == []
        figures.append([t.get_text() for t in fig.findobj(plt.Text)])
        save(fig, out_png)
    monkeypatch.setattr(plots, "_save", recording_save)
    return figures


def test_figure2(tmp_path, monkeypatch):
    texts = capture_figure(monkeypatch, check_overlaps=True)
    plots.figure2(figure2_table(), tmp_path / "figure2.png")
    assert_figure(tmp_path / "figure2.png")
    joined = "\n".join(texts[0]).replace("\n", " ")
    for expected in ("Std training on D_NR", "Adv training on D", "custom", "paper", "ε = 0.25", "99.5", "n/a"):
        assert expected in joined


@pytest.mark.parametrize("archs", [("small_cnn",), ("small_cnn", "resnet18")])
def test_table1(tmp_path, monkeypatch, archs):
    texts = capture_figure(monkeypatch, check_overlaps=True)
    plots.table1(table1_table(archs), tmp_path / "table1.png")
    assert_figure(tmp_path / "table1.png")
    joined = "\n".join(texts[0])
    for expected in ("twin of D_rand", "d_custom", "paper", "replication", "chance (10%)",
                     "test accuracy on the original test set (%)", *archs):
        assert expected in joined


def test_figure2_value_labels_stay_clear_of_a_low_reference_marker(tmp_path, monkeypatch):
    """A tall bar whose paper marker sits near its foot (D's robust accuracy: 31% here, 4.5% in
    the paper) keeps its value label off the marker."""
    table = figure2_table()
    table.loc[0, "robust_acc"] = 31.1
    texts = capture_figure(monkeypatch, check_overlaps=True)
    plots.figure2(table, tmp_path / "figure2.png")
    assert "31.1" in texts[0]


@pytest.mark.parametrize("preset", ["cifar10-cpu.yaml", "cifar10-paper.yaml"])
def test_table1_labels_of_every_preset_set_stay_apart(tmp_path, monkeypatch, preset):
    """The presets' Table 1 bars (up to nine sets, two-line twin labels, the long D_det without
    robust-t rows) keep their tick labels from running into each other."""
    config = yaml.safe_load((REPO / "configs" / preset).read_text())
    sets = [s for s in config["targets"]["train_sets"] if s in plots.TRAIN_SET_LABELS and s not in ("d_r", "d_r_blend", "d_nr")]
    table = pd.DataFrame([{"train_set": s, "arch": "small_cnn_wide", "test_acc": 50.0, "n_test": 2000, "chance": 10.0,
                           "construction_success_rate": np.nan if s == "d" or "leak" in s else 41.1,
                           "paper_test_acc": np.nan, "paper_origin": ""} for s in sets])
    assert "d_det_no_robust_t" in sets and len(sets) >= 9
    capture_figure(monkeypatch, check_overlaps=True)
    plots.table1(table, tmp_path / "table1.png")


def test_amplified_difference_is_exact_and_clipped():
    original = np.array([0.2, 0.2, 0.2, 0.5], dtype=np.float32).reshape(1, 1, 2, 2)
    constructed = np.array([0.22, 0.2, 0.0, 0.9], dtype=np.float32).reshape(1, 1, 2, 2)
    diff = plots.amplified_difference(original, constructed, amplify=10.0)
    np.testing.assert_allclose(diff.ravel(), [0.7, 0.5, 0.0, 1.0], atol=1e-6)
    # uint8 originals are read as 0..255
    np.testing.assert_allclose(plots.amplified_difference((original * 255).round().astype(np.uint8), constructed, 10.0),
                               diff, atol=10 / 255)


def test_image_grid_renders_the_amplified_difference(tmp_path):
    # Uniform images: original 0.2 and constructed 0.22, so ×10 gives a 0.7 grey difference panel (×1: 0.52).
    original = np.full((3, 3, 8, 8), 0.2, dtype=np.float32)
    png = tmp_path / "grid.png"
    plots.image_grid(original, original + 0.02, [0, 1, 2], [3, 4, 5], CLASSES, png, amplify=10.0, title="d_det")
    rgb = assert_figure(png)[..., :3]

    def n_pixels(grey):
        return np.all(np.abs(rgb - grey) < 1.5 / 255, axis=-1).sum()
    assert n_pixels(0.7) > 5_000
    assert n_pixels(0.52) < 100


def test_image_grid_uint8_grayscale_and_wrapping(tmp_path, monkeypatch):
    capture_figure(monkeypatch, check_overlaps=True)
    original = rng.integers(0, 256, (9, 1, 8, 8), dtype=np.uint8)  # 9 > 8 columns: wraps into two blocks
    constructed = np.clip(original / 255 + rng.normal(0, 0.05, original.shape), 0, 1)
    labels = [1, 1, 1, 1, 1, 1, 1, 1, 9]  # "automobile" everywhere: the longest class name
    plots.image_grid(original, constructed, labels, labels[::-1], CLASSES, tmp_path / "g.png", amplify=12.5)
    assert_figure(tmp_path / "g.png")


def test_image_grid_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plots.image_grid(np.zeros((2, 3, 8, 8)), np.zeros((3, 3, 8, 8)), [0, 1], [1, 0], CLASSES, tmp_path / "g.png")
    assert plt.get_fignums() == []


def test_training_curves(tmp_path, monkeypatch):
    capture_figure(monkeypatch, check_overlaps=True)
    logs = {f"targets/set{i}/small_cnn": training_log(5 + i) for i in range(12)}
    logs["sources/empty"] = training_log(0)
    plots.training_curves(logs, tmp_path / "curves.png")
    assert_figure(tmp_path / "curves.png")


@pytest.mark.parametrize("images", [rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8),
                                    rng.random((5, 3, 8, 8), dtype=np.float32)])
def test_inspect_grid(tmp_path, monkeypatch, images):
    texts = capture_figure(monkeypatch, check_overlaps=True)
    plots.inspect_grid(images, np.arange(len(images)) % 10, CLASSES, tmp_path / "inspect.png", n=12)
    assert_figure(tmp_path / "inspect.png")
    assert f"first {min(len(images), 12)} images" in texts[0]


@pytest.mark.parametrize("draw", [
    lambda out: plots.figure2(pd.DataFrame(), out),
    lambda out: plots.figure2(figure2_table().iloc[:0], out),
    lambda out: plots.table1(pd.DataFrame(), out),
    lambda out: plots.table1(table1_table().iloc[:0], out),
    lambda out: plots.training_curves({}, out),
    lambda out: plots.training_curves({"sources/standard": training_log(0)}, out),
    lambda out: plots.image_grid(np.zeros((0, 3, 8, 8)), np.zeros((0, 3, 8, 8)), [], [], CLASSES, out),
    lambda out: plots.inspect_grid(np.zeros((0, 3, 8, 8), dtype=np.uint8), [], CLASSES, out),
], ids=["figure2", "figure2_columns", "table1", "table1_columns", "curves", "curves_empty_log", "image_grid",
        "inspect_grid"])
def test_empty_inputs_say_no_data(tmp_path, monkeypatch, draw):
    texts = capture_figure(monkeypatch)
    draw(tmp_path / "sub" / "empty.png")  # also creates the missing directory
    assert_figure(tmp_path / "sub" / "empty.png")
    assert "no data" in texts[0]


def test_output_must_be_png(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        plots.figure2(figure2_table(), tmp_path / "figure2.pdf")
    assert plt.get_fignums() == []


def test_summary_page_embeds_figure2_above_the_summary_tables(tmp_path):
    import base64
    plots.figure2(figure2_table(), tmp_path / "figure2.png")
    summary = tmp_path / "summary.md"
    summary.write_text("# notbugs results: tiny\n\nData: synthetic.\n\n## Claims against their controls\n\n"
                       "| claim | difference |\n|---|---|\n| d_r > d_r_blend (small_cnn) | +57.6 [36.1, 79.1] |\n")
    plots.summary_page(summary, tmp_path / "figure2.png", tmp_path / "summary.html")
    html = (tmp_path / "summary.html").read_text()
    assert "<h1>notbugs results: tiny</h1>" in html and "<h2>Claims against their controls</h2>" in html
    assert "<td>d_r &gt; d_r_blend (small_cnn)</td>" in html  # a table, not Markdown pipes
    image = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(image) == (tmp_path / "figure2.png").read_bytes()
    assert max(len(line) for line in html.splitlines()) < 10_000  # docutils' limit in the report
    assert html.index("notbugs-figure2") < html.index("<table")
    assert not list(tmp_path.glob("*.partial"))
