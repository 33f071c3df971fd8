"""The tables stage: every model's metrics and every construction's summary, side by side with
the reference numbers of :mod:`notbugs.references`, as the CSVs under ``results/<dataset>/tables``:

- ``models``: one row per model (each replicate its own row);
- ``table1`` and ``figure2``: one row per model *group* (the replicates of one training set and
  architecture): the mean, sd, 95% t-interval and every replicate's value;
- ``claims``: the configured comparisons (``comparisons`` in the config), each a paired test on
  per-example predictions of the same test images (:func:`notbugs.stats.paired_comparison`);
- ``summary.md``: Figure 2, Table 1 and the claims in a few lines (:func:`summary_markdown`),
  printed at the end of a run and shown in the report.

Accuracies are percentages.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from notbugs import hdf5, references
from notbugs.runtime import atomic_write
from notbugs.stats import mean_interval, paired_comparison

log = logging.getLogger(__name__)

# Each PGD set followed by its leakage-only twin.
TABLE1_SETS = ("d", "d_rand", "d_leak_rand", "d_det", "d_leak_det", "d_other", "d_leak_other",
               "d_det_no_robust_t", "d_leak_det_no_robust_t")
# Per-image relative representation distance ‖g(z) − g(x)‖/‖g(x)‖ at the end of an inversion
# (its ``loss`` column), and the share of the way x' → x of a pixel blend (its ``loss`` column).
DISTANCE_QUANTILES = {"inversion": ("inversion_distance", (10, 50, 90)), "blend": ("blend_lambda", (10, 50, 90))}
DISTANCE_PREFIXES = tuple(f"{prefix}_" for prefix, _ in DISTANCE_QUANTILES.values())
CONSTRUCTION_ATTRS = ("success_rate", "mean_perturbation_norm", "eps", "unperturbed_rate", "robust_says_target_rate",
                     "robust_says_label_rate", "rows_kept", "rows_dropped_read_as_target")
_REPLICATE = re.compile(r"^(targets/[^/]+/[^/]+)/r(\d+)$")


def robust_column(eps: float) -> str:
    return f"robust_acc_eps{eps:g}"


def split_model_dir(model_dir: str) -> tuple[str, int | None]:
    """(group, replicate): ``targets/<set>/<arch>/r<k>`` → (``targets/<set>/<arch>``, k);
    a source is its own group without a replicate number."""
    match = _REPLICATE.match(model_dir)
    return (match.group(1), int(match.group(2))) if match else (model_dir, None)


def describe_attack(settings: Mapping) -> str:
    skip = {"eps", "robust_acc", "mean_breaking_norm"}
    return f"eps={settings['eps']:g} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in settings.items() if k not in skip)


def models_table(metrics: Mapping[str, Mapping], constructions: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per model directory (``sources/<name>`` or ``targets/<set>/<arch>/r<k>``)."""
    rows = []
    for model_dir, m in sorted(metrics.items()):
        group, replicate = split_model_dir(model_dir)
        kind = "source" if model_dir.startswith("sources/") else "target"
        train_set = "d" if kind == "source" else model_dir.split("/")[1]
        cons = constructions.get(train_set, {})
        row = {"model": model_dir, "group": group, "replicate": replicate, "kind": kind, "train_set": train_set,
               "arch": m["arch"], "adversarial_training": bool(m["adversarial"]),
               "train_precision": m.get("train_precision", "float32"), "std_acc": 100 * m["std_acc"]}
        for r in m["robust"]:
            row[robust_column(r["eps"])] = 100 * r["robust_acc"]
        row["robust_attack"] = "; ".join(describe_attack(r) for r in m["robust"])
        row["construction_success_rate"] = (100 * cons["success_rate"]
                                            if cons.get("success_rate") is not None else float("nan"))
        row["construction_mean_l2"] = cons.get("mean_perturbation_norm", float("nan"))
        row.update({k: v for k, v in cons.items() if k.startswith(DISTANCE_PREFIXES)})
        row["n_test"] = m["n_test"]
        row["train_fit"] = 100 * m["train_fit"]
        row["train_seconds"] = m["train_seconds"]
        rows.append(row)
    return pd.DataFrame(rows)


def summary_columns(prefix: str, values: Sequence[float]) -> dict:
    """``prefix`` (mean), ``prefix_sd``, ``prefix_ci_low``, ``prefix_ci_high`` and
    ``prefix_replicates`` (every value, ';'-separated, in replicate order)."""
    interval = mean_interval(values)
    return {prefix: interval["mean"], f"{prefix}_sd": interval["sd"], f"{prefix}_ci_low": interval["ci_low"],
            f"{prefix}_ci_high": interval["ci_high"], f"{prefix}_replicates": ";".join(f"{v:.4g}" for v in values)}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (log-space terms)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def _groups(models: pd.DataFrame):
    for group, rows in models.sort_values(["group", "replicate"]).groupby("group", sort=False):
        yield group, rows


def table1(models: pd.DataFrame, n_classes: int, constructions: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Test accuracy per (training set, architecture) group of targets, over its replicates.
    ``p_above_chance`` is the exact one-sided binomial test against chance of the replicate with
    the lowest accuracy (chance is the weakest null; ``claims`` has the controls)."""
    targets = models[(models.kind == "target") & models.train_set.isin(TABLE1_SETS)]
    constructions = constructions or {}
    out = []
    for _, rows in _groups(targets):
        first = rows.iloc[0]
        n = int(first.n_test)
        reference = references.TABLE1.get(first.train_set)
        cons = constructions.get(first.train_set, {})
        out.append({"train_set": first.train_set, "arch": first.arch, "eps": cons.get("eps", float("nan")),
                    "replicates": len(rows), **summary_columns("test_acc", list(rows.std_acc)),
                    "train_fit": rows.train_fit.mean(),
                    "construction_success_rate": first.construction_success_rate,
                    "train_rows": cons.get("rows_kept", float("nan")),
                    "rows_dropped_read_as_target": cons.get("rows_dropped_read_as_target", float("nan")),
                    "unperturbed_rate": 100 * cons.get("unperturbed_rate", float("nan")),
                    "robust_says_target": 100 * cons.get("robust_says_target_rate", float("nan")),
                    "robust_says_label": 100 * cons.get("robust_says_label_rate", float("nan")), "n_test": n,
                    "chance": 100.0 / n_classes,
                    "p_above_chance": binomial_tail(round(rows.std_acc.min() / 100 * n), n, 1 / n_classes),
                    "paper_test_acc": reference.value if reference else float("nan"),
                    "paper_origin": reference.origin if reference else ""})
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table["order"] = table.train_set.map({s: i for i, s in enumerate(TABLE1_SETS)})
    return table.sort_values(["order", "arch"]).drop(columns="order").reset_index(drop=True)


def figure2(models: pd.DataFrame, rows: Mapping[str, str], eps: float) -> pd.DataFrame:
    """Figure 2's bars: ``rows`` maps a label (e.g. standard_on_d_r) to a model group (a source,
    or ``targets/<set>/<arch>`` for all its replicates); robust accuracy at radius ``eps``. The
    paper's four bars come first, in its order, then any others (such as D_R's blend control)."""
    col = robust_column(eps)
    out = []
    order = [label for label in references.FIGURE2 if label in rows] + [l for l in rows if l not in references.FIGURE2]
    for label, group in ((label, rows[label]) for label in order):
        members = models[models.group == group].sort_values("replicate")
        if members.empty:
            continue
        if col not in members or members[col].isna().any():
            raise ValueError(f"Figure 2: model {group} has no robust accuracy at eps={eps:g}")
        paper_std, paper_robust = references.FIGURE2.get(label, (None, None))
        out.append({"label": label, "model": group, "replicates": len(members),
                    **summary_columns("std_acc", list(members.std_acc)),
                    **summary_columns("robust_acc", list(members[col])), "eps": eps,
                    **{k: members[k].iloc[0] for k in members if k.startswith(DISTANCE_PREFIXES)},
                    **autoattack_columns(members),
                    "paper_std_acc": paper_std.value if paper_std else float("nan"),
                    "paper_robust_acc": paper_robust.value if paper_robust else float("nan"),
                    "paper_origin": paper_std.origin if paper_std else ""})
    return pd.DataFrame(out)


def autoattack_columns(members: pd.DataFrame) -> dict:
    """AutoAttack's robust accuracy beside PGD's on the same test images, where it was run."""
    if "robust_acc_autoattack" not in members or members.robust_acc_autoattack.isna().any():
        return {}
    return {"autoattack_n_test": int(members.autoattack_n_test.iloc[0]),
            **summary_columns("robust_acc_autoattack", list(members.robust_acc_autoattack)),
            **summary_columns("robust_acc_pgd_same_images", list(members.robust_acc_pgd_same_images))}


def test_rows(predictions_path: str | Path) -> np.ndarray:
    """Which test images a predictions file covers (a subset stores them as ``test_index``)."""
    with hdf5.open_artifact(predictions_path, kind="evaluation") as art:
        split = art.split("test")
        return split["test_index"][:] if "test_index" in split else np.arange(len(split))


def correct_per_example(predictions_path: str | Path, metric: str, eps: float) -> np.ndarray:
    """Booleans per test image: clean prediction right (``clean``), or clean and attacked
    prediction at ``eps`` both right (``robust``)."""
    with hdf5.open_artifact(predictions_path, kind="evaluation") as art:
        split = art.split("test")
        labels = split.labels
        correct = split["clean_pred"][:] == labels
        if metric == "robust":
            column = f"robust_pred_eps{eps:g}"
            if column not in split:
                raise ValueError(f"{predictions_path}: no robust predictions at eps={eps:g}")
            correct &= split[column][:] == labels
    return correct


def claims(models: pd.DataFrame, comparisons: Sequence[Mapping], eps: float,
           correct: Callable[[str, str], np.ndarray]) -> pd.DataFrame:
    """One row per comparison and target architecture: group ``better`` against ``worse`` on the
    same test images, replicate k against replicate k (``correct(model_dir, metric)`` gives the
    per-example booleans)."""
    targets = models[models.kind == "target"]
    out = []
    for comparison in comparisons:
        metric = comparison["metric"]
        for arch in sorted(targets.arch.unique()):
            better, worse = (targets[(targets.train_set == comparison[side]) & (targets.arch == arch)]
                             .set_index("replicate").model for side in ("better", "worse"))
            replicates = sorted(set(better.index) & set(worse.index))  # replicate k against replicate k
            if not replicates:
                raise ValueError(f"comparison {comparison['better']} vs {comparison['worse']} ({arch}): "
                                 "no replicate trained on both")
            a = np.stack([correct(better[k], metric) for k in replicates])
            b = np.stack([correct(worse[k], metric) for k in replicates])
            out.append({"better": comparison["better"], "worse": comparison["worse"], "arch": arch, "metric": metric,
                        "eps": eps if metric == "robust" else float("nan"),
                        "better_acc": 100 * a.mean(), "worse_acc": 100 * b.mean(), **paired_comparison(a, b)})
    return pd.DataFrame(out)


def distance_quantiles(art: hdf5.Artifact, method: str) -> dict[str, float]:
    """How far each inversion got (or how far each blend went), as percentiles over the rows."""
    if method not in DISTANCE_QUANTILES:
        return {}
    prefix, percentiles = DISTANCE_QUANTILES[method]
    values = art.split("train")["loss"][:]
    return {f"{prefix}_q{q}": float(v) for q, v in zip(percentiles, np.percentile(values, percentiles))}


def construction_summary(path: str | Path, name: str) -> dict:
    """What the tables show of the constructed set ``name`` stored at ``path``: its recorded
    attributes (CONSTRUCTION_ATTRS), its ε and, for inversions and blends, distance percentiles."""
    with hdf5.open_artifact(path, kind="constructed") as art:
        summary = {k: art.attrs[k] for k in CONSTRUCTION_ATTRS if k in art.attrs}
        summary["eps"] = art.config[name].get("eps", float("nan"))
        summary.update(distance_quantiles(art, art.config[name]["method"]))
    return summary


def write_tables(metrics_files: Mapping[str, str], predictions_files: Mapping[str, str],
                 constructed_files: Mapping[str, str], data_path: str | Path, *, figure2_rows: Mapping[str, str],
                 figure2_eps: float, comparisons: Sequence[Mapping], outputs: Mapping[str, str],
                 autoattack_files: Mapping[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """Aggregate every metrics.json, predictions.h5 and construction summary into the CSV tables
    ``outputs`` names (keys models, table1, figure2, claims). ``autoattack_files``: the
    AutoAttack predictions of the Figure 2 models (``evaluation.figure2_autoattack``), if any."""
    metrics = {name: json.loads(Path(path).read_text()) for name, path in metrics_files.items()}
    constructions = {name: construction_summary(path, name) for name, path in constructed_files.items()}
    with hdf5.open_artifact(data_path, kind="data") as data:
        n_classes = len(data.class_names)
    models = models_table(metrics, constructions)
    for model_dir, path in (autoattack_files or {}).items():
        autoattack = correct_per_example(path, "robust", figure2_eps)
        pgd = correct_per_example(predictions_files[model_dir], "robust", figure2_eps)[test_rows(path)]
        row = models.model == model_dir
        models.loc[row, "autoattack_n_test"] = len(autoattack)
        models.loc[row, "robust_acc_autoattack"] = 100 * autoattack.mean()
        models.loc[row, "robust_acc_pgd_same_images"] = 100 * pgd.mean()

    def correct(model_dir: str, metric: str) -> np.ndarray:
        return correct_per_example(predictions_files[model_dir], metric, figure2_eps)

    tables = {"models": models, "table1": table1(models, n_classes, constructions),
              "figure2": figure2(models, figure2_rows, figure2_eps),
              "claims": claims(models, comparisons, figure2_eps, correct)}
    for key, df in tables.items():
        with atomic_write(outputs[key]) as tmp:
            df.to_csv(tmp, index=False, float_format="%.4g")
        log.info("%s:\n%s", outputs[key], df.to_string(index=False))
    if "summary" in outputs:
        with hdf5.open_artifact(data_path, kind="data") as data:
            dataset, description = data.config["name"], data.attrs["source"]
        text = summary_markdown(tables["figure2"], tables["table1"], tables["claims"], dataset=dataset,
                                description=description, eps=figure2_eps)
        with atomic_write(outputs["summary"]) as tmp:
            tmp.write_text(text)
    return tables


def _with_interval(row: pd.Series, prefix: str) -> str:
    if pd.isna(row.get(prefix)):
        return "–"
    low, high = row.get(f"{prefix}_ci_low"), row.get(f"{prefix}_ci_high")
    return f"{row[prefix]:.1f}" + ("" if pd.isna(low) else f" [{low:.1f}, {high:.1f}]")


def summary_markdown(figure2_table: pd.DataFrame, table1_table: pd.DataFrame, claims_table: pd.DataFrame, *,
                     dataset: str, description: str, eps: float) -> str:
    """The run's headline numbers as Markdown: means with 95% intervals over replicates."""
    lines = [f"# notbugs results: {dataset}", "", f"Data: {description}. Accuracies in %, mean [95% interval "
             "over replicates]; each claim is tested against its control on the same test images.", "",
             f"## Figure 2 (robust accuracy at eps = {eps:g})", "", "| model | replicates | test acc | robust acc |",
             "|---|---|---|---|"]
    for _, row in figure2_table.iterrows():
        lines.append(f"| {row['label']} ({row['model']}) | {row['replicates']} | {_with_interval(row, 'std_acc')} | "
                     f"{_with_interval(row, 'robust_acc')} |")
    lines += ["", "## Table 1 (test accuracy of targets trained on each set)", "",
              "| training set | rows | attack reached t | arch | eps | replicates | test acc | fit of own training set | paper |",
              "|---|---|---|---|---|---|---|---|---|"]
    for _, row in table1_table.iterrows():
        paper = "–" if pd.isna(row["paper_test_acc"]) else f"{row['paper_test_acc']:g} ({row['paper_origin']})"
        eps_text = "–" if pd.isna(row["eps"]) else f"{row['eps']:g}"
        rows_text = "–" if pd.isna(row.get("train_rows", float("nan"))) else f"{int(row['train_rows']):,}"
        success = row.get("construction_success_rate", float("nan"))
        success_text = "–" if pd.isna(success) else f"{success:.1f}"
        lines.append(f"| {row['train_set']} | {rows_text} | {success_text} | {row['arch']} | {eps_text} | {row['replicates']} | "
                     f"{_with_interval(row, 'test_acc')} | {row['train_fit']:.1f} | {paper} |")
    lines += ["", "## Claims against their controls", "",
              "| claim | metric | difference [95% interval] | p (sign test) | p (worst replicate pair, one-sided) |",
              "|---|---|---|---|---|"]
    for _, row in claims_table.iterrows():
        lines.append(f"| {row['better']} > {row['worse']} ({row['arch']}) | {row['metric']} | "
                     f"{row['diff']:+.1f} [{row['diff_ci_low']:.1f}, {row['diff_ci_high']:.1f}] | "
                     f"{row['p_value']:.2g} | {row['worst_replicate_p']:.2g} |")
    return "\n".join(lines) + "\n"
