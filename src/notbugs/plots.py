"""Stage 6, plots: Figure 2, Table 1 as bars, constructed-image grids, training curves, and the
report's summary page.

Every figure is written twice: the given ``.png`` (200 dpi) and a ``.pdf`` with the same stem.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import markdown
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from notbugs.runtime import atomic_write  # noqa: E402

# Okabe-Ito: distinguishable under the common forms of colour blindness.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
FIGURE2_LABELS = {
    "standard_on_d": "Std training on D",
    "adversarial_on_d": "Adv training on D",
    "standard_on_d_r": "Std training on D_R",
    "standard_on_d_nr": "Std training on D_NR",
    "standard_on_d_r_blend": "Std training on D_R's pixel blend",
}
TRAIN_SET_LABELS = {
    "d": "D", "d_r": "D_R", "d_r_blend": "D_R's pixel blend", "d_nr": "D_NR", "d_rand": "D_rand", "d_det": "D_det", "d_other": "D_other",
    "d_leak_rand": "twin of D_rand\n(leakage only)", "d_leak_det": "twin of D_det\n(leakage only)",
    "d_leak_other": "twin of D_other\n(leakage only)",
    "d_det_no_robust_t": "D_det without\nrows the robust\nmodel reads as t",
    "d_leak_det_no_robust_t": "its twin\n(leakage only)",
    "d_det_nontransferable": "D_det, non-transferable", "d_relabel": "D_relabel",
}
# Reference markers: solid for numbers from the paper, dashed for numbers from a replication.
REFERENCE_STYLES = {"paper": "-", "replication": (0, (1.5, 1))}
DPI = 200
_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,  # embed TrueType, not Type 3: journals ask for it and text stays editable
}

PathLike = str | os.PathLike


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(_STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _save(fig: plt.Figure, out_png: PathLike) -> None:
    """Write ``out_png`` and its ``.pdf`` sibling, then close ``fig``."""
    try:
        out_png = Path(out_png)
        if out_png.suffix.lower() != ".png":
            raise ValueError(f"expected a .png output path, got {out_png}")
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=DPI)
        fig.set_layout_engine("none")  # keep the layout just computed: same figure, and much faster
        fig.savefig(out_png.with_suffix(".pdf"))
    finally:
        plt.close(fig)


def _no_data(out_png: PathLike, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
    ax.set_axis_off()
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="0.4", transform=ax.transAxes)
    ax.set_title(title)
    _save(fig, out_png)


def _fmt(v: float) -> str:
    return "n/a" if np.isnan(v) else f"{v:.1f}"


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A float column, all-NaN if absent."""
    return table[name].to_numpy(float) if name in table else np.full(len(table), np.nan)


def _reference_kind(origin) -> str:
    """'paper', 'replication' or 'reference' for an origin such as 'paper (approx.)'."""
    origin = "" if pd.isna(origin) else str(origin).lower()
    return next((k for k in REFERENCE_STYLES if k in origin), "reference")


def _replicate_values(table: pd.DataFrame, prefix: str) -> list[np.ndarray]:
    """Every replicate's value per row (column ``<prefix>_replicates``, ';'-separated)."""
    column = f"{prefix}_replicates"
    if column not in table:
        return [np.array([]) for _ in range(len(table))]
    return [np.array([float(v) for v in str(cell).split(";") if v not in ("", "nan")]) if pd.notna(cell) else
            np.array([]) for cell in table[column]]


def _bars_with_references(ax, x, heights, refs, width, color, label, ref_kinds, table=None, prefix=None) -> None:
    """Bars (means) with value labels and black reference markers (``refs``, NaN = none) across
    each bar; with ``table``/``prefix``, a 95% interval as an error bar and every replicate as a dot."""
    ax.bar(x, np.nan_to_num(heights), width, color=color, label=label, zorder=2)
    tops = np.nan_to_num(np.asarray(heights, float))
    if table is not None:
        # A t-interval over few replicates can pass 0 or 100; an accuracy cannot, so draw it clipped.
        low = np.clip(_column(table, f"{prefix}_ci_low"), 0, 100)
        high = np.clip(_column(table, f"{prefix}_ci_high"), 0, 100)
        has = np.isfinite(low) & np.isfinite(high)
        if has.any():
            ax.errorbar(np.asarray(x)[has], np.asarray(heights)[has],
                        yerr=[np.asarray(heights)[has] - low[has], high[has] - np.asarray(heights)[has]],
                        fmt="none", ecolor="0.15", elinewidth=1, capsize=2.5, zorder=5)
            tops = np.where(has, np.fmax(tops, high), tops)
        for xi, values in zip(x, _replicate_values(table, prefix)):
            if len(values) > 1:
                jitter = np.linspace(-width / 5, width / 5, len(values))
                ax.scatter(xi + jitter, values, s=7, color="white", edgecolors="0.15", linewidths=0.6, zorder=6)
    for xi, h, top, ref, kind in zip(x, heights, tops, refs, ref_kinds):
        if not np.isnan(ref):
            ax.hlines(ref, xi - width / 2, xi + width / 2, colors="k", lw=2.2, zorder=3,
                      linestyles=REFERENCE_STYLES.get(kind, "-"))
        # Inside the bar at its foot, where the interval does not go, and above a reference marker
        # that sits there (the paper's 4.5% robust accuracy of D); a bar too short to hold it gets
        # it above everything drawn over it.
        foot = ref + 1.5 if 0 <= ref < 8 else 1.5
        if np.isfinite(h) and h >= foot + 6.5:
            ax.text(xi, foot, _fmt(h), ha="center", va="bottom", fontsize=7.5, color="white", fontweight="bold",
                    zorder=7)
        else:
            ax.text(xi, np.nanmax([top, ref]) + 1.5, _fmt(h), ha="center", va="bottom", fontsize=7.5, zorder=4)


def _percent_axis(ax, ylabel: str) -> None:
    # 0-100 scale, with headroom above 100 so value labels of near-perfect bars stay clear of the title.
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20))
    ax.spines["left"].set_bounds(0, 100)
    ax.set_ylabel(ylabel)
    ax.yaxis.grid(True, color="0.9", zorder=0)
    ax.set_axisbelow(True)


@_styled
def figure2(table: pd.DataFrame, out_png: PathLike) -> None:
    """The paper's Figure 2: standard and robust test accuracy per training setup."""
    title = "Figure 2: standard and robust accuracy on the original test set"
    if table.empty:
        return _no_data(out_png, title)
    n = len(table)
    x = np.arange(n)
    width = 0.38
    eps = ", ".join(f"{e:g}" for e in pd.unique(table["eps"].dropna())) if "eps" in table else ""
    kinds = ["paper"] * n  # every Figure 2 reference is drawn as "paper", including "paper (approx.)"
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 * n + 1.5), 4.2), layout="constrained")
    _bars_with_references(ax, x - width / 2, _column(table, "std_acc"), _column(table, "paper_std_acc"),
                          width, OKABE_ITO[0], "standard accuracy", kinds, table, "std_acc")
    _bars_with_references(ax, x + width / 2, _column(table, "robust_acc"), _column(table, "paper_robust_acc"),
                          width, OKABE_ITO[1], f"robust accuracy (ε = {eps})" if eps else "robust accuracy", kinds,
                          table, "robust_acc")
    ax.set_xticks(x, [textwrap.fill(FIGURE2_LABELS.get(lbl, str(lbl)), 14) for lbl in table["label"]])
    _percent_axis(ax, "accuracy on the original test set (%)")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(_column(table, "paper_std_acc")).any() or np.isfinite(_column(table, "paper_robust_acc")).any():
        handles.append(Line2D([], [], color="k", lw=2.2))
        labels.append("paper")
    _interval_legend(table, "std_acc", handles, labels)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
    _save(fig, out_png)


def _interval_legend(table: pd.DataFrame, prefix: str, handles: list, labels: list) -> None:
    replicates = _column(table, "replicates")
    if np.nanmax(replicates, initial=1) > 1:
        handles.append(Line2D([], [], color="0.15", marker="o", markerfacecolor="white", markersize=4, lw=1))
        labels.append(f"replicates, 95% interval (n = {int(np.nanmax(replicates))})")


@_styled
def table1(table: pd.DataFrame, out_png: PathLike) -> None:
    """Table 1 as bars: accuracy on the original test set of models trained on each constructed set."""
    title = "Table 1: training on constructed data, testing on the original test set"
    if table.empty:
        return _no_data(out_png, title)
    sets = list(pd.unique(table["train_set"]))
    archs = list(pd.unique(table["arch"]))
    width = 0.8 / len(archs)
    x = np.array([sets.index(s) + (archs.index(a) - (len(archs) - 1) / 2) * width
                  for s, a in zip(table["train_set"], table["arch"])])
    colors = [OKABE_ITO[archs.index(a) % len(OKABE_ITO)] for a in table["arch"]]
    kinds = [_reference_kind(o) for o in table.get("paper_origin", [""] * len(table))]

    fig, ax = plt.subplots(figsize=(max(5.5, 0.3 * len(table) + 0.8 * len(sets) + 1.2), 4.4),
                           layout="constrained")
    _bars_with_references(ax, x, _column(table, "test_acc"), _column(table, "paper_test_acc"),
                          width * 0.92, colors, None, kinds, table, "test_acc")
    ticks = []
    for s in sets:
        rate = _column(table[table["train_set"] == s], "construction_success_rate")
        rate = rate[np.isfinite(rate)]
        name = TRAIN_SET_LABELS.get(s, str(s))
        ticks.append(f"{name}\nattack success\n{rate[0]:.1f}%" if len(rate) else name)
    ax.set_xticks(range(len(sets)), ticks)
    _percent_axis(ax, "test accuracy on the original test set (%)")

    handles, labels = [], []
    if len(archs) > 1:
        handles += [Patch(color=OKABE_ITO[i % len(OKABE_ITO)]) for i in range(len(archs))]
        labels += [str(a) for a in archs]
    chance = _column(table, "chance")
    if np.isfinite(chance).any():
        c = chance[np.isfinite(chance)][0]
        handles.append(ax.axhline(c, color="0.35", ls="--", lw=1, zorder=1))
        labels.append(f"chance ({c:.3g}%)")
    has_ref = np.isfinite(_column(table, "paper_test_acc"))
    for kind in dict.fromkeys(k for k, r in zip(kinds, has_ref) if r):
        handles.append(Line2D([], [], color="k", lw=2.2, ls=REFERENCE_STYLES.get(kind, "-")))
        labels.append(kind)
    _interval_legend(table, "test_acc", handles, labels)
    details = [f"arch: {archs[0]}"] if len(archs) == 1 else []
    n_test = pd.unique(table["n_test"].dropna()) if "n_test" in table else []
    if len(n_test) == 1:
        details.append(f"n = {int(n_test[0]):,} test images")
    ax.set_title(title + (f"\n({', '.join(details)})" if details else ""))
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    _save(fig, out_png)


def _as_float_images(images) -> np.ndarray:
    """N×C×H×W floats in [0, 1]; integer images are taken to be 0..255."""
    images = np.asarray(images)
    if images.dtype.kind in "ui":
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def amplified_difference(original, constructed, amplify: float = 10.0) -> np.ndarray:
    """``clip(0.5 + amplify * (constructed - original), 0, 1)``: grey where the images agree."""
    return np.clip(0.5 + amplify * (_as_float_images(constructed) - _as_float_images(original)), 0.0, 1.0)


def _show(ax, image: np.ndarray) -> None:
    """Draw one C×H×W image (C = 1 or 3) without ticks or frame."""
    image = np.clip(image, 0, 1)
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _class_name(class_names: Sequence, label) -> str:
    i = int(label)
    name = class_names[i] if 0 <= i < len(class_names) else str(i)
    return name.decode() if isinstance(name, bytes) else str(name)


@_styled
def image_grid(original: np.ndarray, constructed: np.ndarray, orig_labels, new_labels, class_names: list[str],
               out_png: PathLike, amplify: float = 10.0, title: str = "") -> None:
    """Originals, constructed images and their amplified difference, in blocks of three rows."""
    original, constructed = _as_float_images(original), _as_float_images(constructed)
    if original.shape != constructed.shape:
        raise ValueError(f"original {original.shape} and constructed {constructed.shape} differ in shape")
    n = len(original)
    if n == 0:
        return _no_data(out_png, title or "constructed images")
    diff = amplified_difference(original, constructed, amplify)
    l2 = np.sqrt(((constructed - original) ** 2).reshape(n, -1).sum(axis=1))
    cols = min(n, 8)  # wrap wide grids into blocks so each image stays legible
    blocks = math.ceil(n / cols)
    fig, axes = plt.subplots(3 * blocks, cols, figsize=(1.15 * cols + 0.5, 3.9 * blocks + 0.4),
                             layout="constrained", squeeze=False)
    row_names = ["original", "constructed", f"difference ×{amplify:g}"]
    for i in range(blocks * cols):
        b, c = divmod(i, cols)
        cells = axes[3 * b:3 * b + 3, c]
        if i >= n:
            for ax in cells:
                fig.delaxes(ax)
            continue
        for ax, img in zip(cells, (original[i], constructed[i], diff[i])):
            _show(ax, img)
        cells[0].set_title(_class_name(class_names, orig_labels[i]), fontsize=8)
        cells[1].set_title(f"→ {_class_name(class_names, new_labels[i])}", fontsize=8)
        cells[2].set_xlabel(rf"$\|\delta\|_2$ = {l2[i]:.2f}", fontsize=7.5)
        if c == 0:
            for ax, name in zip(cells, row_names):
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, out_png)


@_styled
def training_curves(logs: Mapping[str, pd.DataFrame], out_png: PathLike) -> None:
    """Train loss and train accuracy against epoch, one line per model."""
    title = "Training curves"
    logs = {name: df for name, df in logs.items() if df is not None and not df.empty}
    if not logs:
        return _no_data(out_png, title)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained", sharex=True)
    colors = plt.get_cmap("tab10").colors
    styles = ["-", "--", ":", "-."]  # beyond ten models, cycle line styles as well as colours
    for i, (name, df) in enumerate(logs.items()):
        kw = {"color": colors[i % 10], "ls": styles[(i // 10) % len(styles)], "lw": 1.4,
              "marker": "o" if len(df) <= 20 else None, "ms": 3, "label": name}
        ax_loss.plot(df["epoch"], df["train_loss"], **kw)
        ax_acc.plot(df["epoch"], 100 * df["train_acc"], **kw)
    ax_loss.set_ylabel("train loss (cross-entropy, nats)")
    ax_loss.set_title("training loss")
    ax_acc.set_ylabel("train accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title("training accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="0.9")
    fig.suptitle(title)
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(logs), 3), frameon=False)
    _save(fig, out_png)


@_styled
def inspect_grid(images: np.ndarray, labels, class_names, out_png: PathLike, n: int = 32,
                 source: str = "") -> None:
    """The first ``n`` images, each titled with its class name; ``source`` (file and split) in
    the figure's title."""
    images = _as_float_images(images[:n])
    k = len(images)
    if k == 0:
        return _no_data(out_png, "images")
    cols = min(k, 8)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols + 0.3, 1.3 * rows + 0.5),
                             layout="constrained", squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < k:
            _show(ax, images[i])
            ax.set_title(_class_name(class_names, labels[i]), fontsize=8)
        else:
            fig.delaxes(ax)
    fig.suptitle(f"{source}: first {k} images" if source else f"first {k} images", fontsize=9)
    _save(fig, out_png)


# --- Studies ----------------------------------------------------------------------------------

@_styled
def transfer(table: pd.DataFrame, out_png: PathLike) -> None:
    """Paper Fig. 3: test accuracy after training on D_det against the transfer rate of the
    source's adversarial examples to a standard model of the same architecture."""
    title = "Transferability vs learnability (paper Fig. 3)"
    if table.empty:
        return _no_data(out_png, title)
    fig, ax = plt.subplots(figsize=(4.6, 3.8), layout="constrained")
    x, y = _column(table, "transfer_rate"), _column(table, "constructed_set_test_acc")
    for i, (arch, xi, yi) in enumerate(zip(table["arch"], x, y)):
        ax.scatter(xi, yi, s=40, color=OKABE_ITO[i % len(OKABE_ITO)], zorder=3, label=str(arch))
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, slope * xs + intercept, color="0.4", lw=1, ls="--", zorder=2)
    ax.axhline(10, color="0.6", lw=0.8, ls=":", zorder=1)
    ax.set_xlabel("transfer success rate of the source's attack (%)")
    ax.set_ylabel("test accuracy after training on D_det (%)")
    ax.grid(True, color="0.92", zorder=0)
    r = _column(table, "pearson_r")[0]
    ax.set_title(f"{title}\nPearson r = {_fmt_r(r)}, source success {_column(table, 'source_attack_success')[0]:.1f}%")
    ax.legend(frameon=False, loc="best")
    _save(fig, out_png)


def _fmt_r(r: float) -> str:
    return "n/a" if np.isnan(r) else f"{r:.2f}"


@_styled
def robust_leakage(accuracy: pd.DataFrame, features: pd.DataFrame, out_png: PathLike) -> None:
    """Goh's leakage study: accuracy from the robust linear features only, beside the deep model,
    and each feature's certified robust usefulness γ_i."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.8), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.2, 1]})
    sets = list(accuracy["train_set"])
    x = np.arange(len(sets))
    width = 0.38
    _bars_with_references(left, x - width / 2, _column(accuracy, "features_only_test_acc"),
                          _column(accuracy, "paper_features_only"), width * 0.92, OKABE_ITO[0],
                          "linear on robust features", ["paper"] * len(sets))
    _bars_with_references(left, x + width / 2, _column(accuracy, "deep_model_test_acc"),
                          np.full(len(sets), np.nan), width * 0.92, OKABE_ITO[1], "deep model", [""] * len(sets))
    left.axhline(_column(accuracy, "chance")[0], color="0.35", ls="--", lw=1, zorder=1)
    left.set_xticks(x, [TRAIN_SET_LABELS.get(s, s) for s in sets])
    _percent_axis(left, "test accuracy (%)")
    handles, labels = left.get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", lw=2.2))
    labels.append("Goh (CIFAR-10)")
    left.legend(handles, labels, frameon=False, loc="upper right", fontsize=7)
    if "premises_hold" in accuracy and not bool(accuracy["premises_hold"].iloc[0]):
        left.set_title(f"Robust-feature leakage (Goh): NOT VALID here\nspec 1 holds for "
                       f"{int(accuracy['spec1_features_holding'].iloc[0])}/{len(features)} features, spec 2: "
                       f"{accuracy['spec2_static_fraction'].iloc[0]:.0f}% of test predictions static (needs 80%)",
                       color=OKABE_ITO[1], fontsize=8)
    else:
        left.set_title("Robust-feature leakage (Goh)")

    # Goh's specification 1: γ ≥ 0 for at least one class, so each feature's best class is shown
    column = "spec1_best_gamma" if "spec1_best_gamma" in features else "certified_gamma"
    gamma = _column(features, column)
    colors = [OKABE_ITO[2] if g >= 0 else OKABE_ITO[5] for g in gamma]
    right.bar(features["feature"], gamma, color=colors, zorder=2)
    right.axhline(0, color="k", lw=0.8)
    right.set_xlabel("feature i (logit of the robust linear model)")
    right.set_ylabel("certified γ_i, best class (spec 1: ≥ 0)")
    right.set_title(f"Certified robust usefulness at ε = {_column(features, 'eps')[0]:g}")
    right.yaxis.grid(True, color="0.9", zorder=0)
    _save(fig, out_png)


@_styled
def rebuttals(table: pd.DataFrame, out_png: PathLike) -> None:
    """Nakkiran's non-transferable D_det beside plain D_det, and Wallace's relabelling."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.8), layout="constrained")
    nak = table[table["study"] == "nakkiran"]
    x = np.arange(len(nak))
    width = 0.38
    kinds = ["replication"] * len(nak)
    _bars_with_references(left, x - width / 2, _column(nak, "target_test_acc"), _column(nak, "paper_target_test_acc"),
                          width * 0.92, OKABE_ITO[0], "test accuracy after training on it", kinds)
    _bars_with_references(left, x + width / 2, _column(nak, "judge_transfer_rate"), np.full(len(nak), np.nan),
                          width * 0.92, OKABE_ITO[3], "transfer to a fresh model", [""] * len(nak))
    left.set_xticks(x, [TRAIN_SET_LABELS.get(s, s) for s in nak["train_set"]])
    left.axhline(10, color="0.35", ls="--", lw=1, zorder=1)
    _percent_axis(left, "%")
    handles, labels = left.get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", lw=2.2, ls=REFERENCE_STYLES["replication"]))
    labels.append("Nakkiran / Wallace (CIFAR-10)")
    left.legend(handles, labels, frameon=False, loc="upper right", fontsize=7)
    left.set_title("Non-transferable adversarial examples (Nakkiran)")

    wal = table[table["study"] == "wallace"]
    if len(wal):
        row = wal.iloc[0]
        values = [row["relabeller_test_acc"], row["kept_fraction"], row["target_test_acc"]]
        refs = [row["paper_relabeller_test_acc"], row["paper_kept_fraction"], row["paper_target_test_acc"]]
        _bars_with_references(right, np.arange(3), np.array(values, float), np.array(refs, float), 0.6,
                              OKABE_ITO[4], None, ["replication"] * 3)
        right.set_xticks(np.arange(3), ["relabeller\ntest acc", "training images\nkept", "fresh model\ntest acc"])
        right.axhline(10, color="0.35", ls="--", lw=1, zorder=1)
    _percent_axis(right, "%")
    right.set_title("Learning from wrongly labelled data (Wallace)")
    _save(fig, out_png)


@_styled
def gaussian(fits: pd.DataFrame, misalignment: pd.DataFrame, eigen: pd.DataFrame, out_png: PathLike) -> None:
    """The Gaussian model: the robust metric flattens towards the identity, for robust logistic
    regression (Σ+κI, solid) and for the paper's robust maximum likelihood (Σ_r, dashed) (left), the
    standard classifier's vulnerability grows with misalignment (middle), robust weights (∝ input
    gradients) align with μ (right)."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
    eps_values = sorted(pd.unique(fits["eps"]))
    colors = {e: OKABE_ITO[i % len(OKABE_ITO)] for i, e in enumerate(eps_values)}

    cond = eigen["condition_number"].max()
    for e in eps_values:
        rows = eigen[(eigen["condition_number"] == cond) & (eigen["eps"] == e)].sort_values("index")
        label = "Σ (standard)" if e == 0 else f"Σ+κI, ε={e:g} (κ={rows['kappa'].iloc[0]:.2g})"
        a.plot(rows["index"], rows["metric_eig"], marker="o", ms=3, color=colors[e], label=label)
        if e > 0 and "theorem2_eig" in rows:
            a.plot(rows["index"], rows["theorem2_eig"], ls="--", lw=1, color=colors[e],
                   label=f"Σ_r of Theorem 2, ε={e:g}")
    a.set_yscale("log")
    a.set_xlabel("eigenvalue index")
    a.set_ylabel("eigenvalue of the learned metric (trace-normalised)")
    a.set_title(f"Robust training flattens the metric\n(condition number {cond:g})")
    a.legend(frameon=False, fontsize=7)

    for e in eps_values[1:]:
        rows = misalignment[misalignment["eps"] == e].sort_values("misalignment")
        b.plot(rows["misalignment"], 100 * rows["vulnerability_standard"], marker="o", ms=3, color=colors[e],
               label=f"standard, ε={e:g}")
        b.plot(rows["misalignment"], 100 * rows["vulnerability_robust"], ls="--", color=colors[e], lw=1,
               label=f"robust, ε={e:g}")
    b.set_xlabel("misalignment 1 − cos(Σ⁻¹μ, μ)")
    b.set_ylabel("clean − robust accuracy (points)")
    b.set_title("Vulnerability grows with misalignment")
    b.legend(frameon=False, fontsize=6.5, ncols=2)

    conds = sorted(pd.unique(fits["condition_number"]))
    for i, k in enumerate(conds):
        rows = fits[fits["condition_number"] == k].sort_values("eps")
        c.plot(rows["eps"], rows["cos_w_mu"], marker="o", ms=3, color=OKABE_ITO[i % len(OKABE_ITO)],
               label=f"cond {k:g}")
    c.set_xlabel("ε of robust training (0 = standard)")
    c.set_ylabel("cos(w, μ)  (input gradients ∝ w)")
    c.set_title("Robust gradients align with μ")
    c.legend(frameon=False, fontsize=7, ncols=2)
    for ax in (a, b, c):
        ax.grid(True, color="0.92", zorder=0)
    _save(fig, out_png)


def summary_page(summary_md: PathLike, figure_png: PathLike, out_html: PathLike) -> None:
    """The run summary (``summary.md``) as one self-contained HTML fragment with Figure 2 embedded
    above its tables: the report's landing page shows it, so a reader sees what came out without
    opening anything."""
    out_html = Path(out_html)
    text = Path(summary_md).read_text()
    title, _, body = text.partition("\n")
    # In lines of 76 characters: docutils refuses longer lines when the report embeds this page,
    # and browsers skip the whitespace inside a base64 data URI.
    image = base64.encodebytes(Path(figure_png).read_bytes()).decode("ascii").strip()
    html = "\n".join([
        '<div class="notbugs-summary">',
        markdown.markdown(title),
        f'<img class="notbugs-figure2" alt="Figure 2" style="max-width: 100%" src="data:image/png;base64,{image}">',
        markdown.markdown(body, extensions=["tables"]).replace("<table>", '<table class="table table-sm">'),
        "</div>",
    ])
    out_html.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_html) as tmp:
        tmp.write_text(html + "\n")
