"""The tables stage: every model's metrics and every construction's summary, side by side
with the reference numbers of :mod:`notbugs.references`, as the CSVs under
``results/<dataset>/tables`` (models, table1, figure2).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping

import pandas as pd

from notbugs import hdf5, references

log = logging.getLogger(__name__)

TABLE1_SETS = ("d", "d_rand", "d_det", "d_other", "d_leak_rand", "d_leak_det")


def robust_column(eps: float) -> str:
    return f"robust_acc_eps{eps:g}"


def models_table(metrics: Mapping[str, Mapping], constructions: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per model directory ("sources/<name>" or "targets/<train set>/<arch>")."""
    rows = []
    for model_dir, m in sorted(metrics.items()):
        parts = model_dir.split("/")
        kind = "source" if parts[0] == "sources" else "target"
        train_set = "d" if kind == "source" else parts[1]
        cons = constructions.get(train_set, {})
        row = {
            "model": model_dir, "kind": kind, "train_set": train_set, "arch": m.get("arch"),
            "adversarial_training": bool(m.get("adversarial")),
            "std_acc": 100 * m["std_acc"],
        }
        for r in m["robust"]:
            row[robust_column(r["eps"])] = 100 * r["robust_acc"]
        row["robust_attack"] = "; ".join(
            f"{r['norm']} eps={r['eps']:g} steps={r['steps']} step={r['step_size']:.4g} restarts={r['restarts']}"
            for r in m["robust"])
        row["construction_success_rate"] = (100 * cons["success_rate"]
                                            if cons.get("success_rate") is not None else float("nan"))
        row["construction_mean_l2"] = cons.get("mean_perturbation_norm", float("nan"))
        row["n_test"] = m["n_test"]
        row["train_seconds"] = m.get("train_seconds")
        rows.append(row)
    return pd.DataFrame(rows)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (log-space terms, no scipy needed)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def table1(models: pd.DataFrame, n_classes: int) -> pd.DataFrame:
    rows = models[(models.kind == "target") & models.train_set.isin(TABLE1_SETS)].copy()
    rows["order"] = rows.train_set.map({s: i for i, s in enumerate(TABLE1_SETS)})
    rows = rows.sort_values(["order", "arch"])
    out = rows[["train_set", "arch", "std_acc", "construction_success_rate", "n_test"]].rename(
        columns={"std_acc": "test_acc"})
    out["chance"] = 100.0 / n_classes
    # One-sided exact binomial test of "no better than chance" on the n_test test images.
    out["p_above_chance"] = [binomial_tail(round(acc / 100 * n), int(n), 1 / n_classes)
                             for acc, n in zip(out.test_acc, out.n_test)]
    reference = {s: references.TABLE1[s] for s in out.train_set if s in references.TABLE1}
    out["paper_test_acc"] = out.train_set.map(lambda s: reference[s].value if s in reference else float("nan"))
    out["paper_origin"] = out.train_set.map(lambda s: reference[s].origin if s in reference else "")
    return out.reset_index(drop=True)


def figure2(models: pd.DataFrame, rows: Mapping[str, str], eps: float) -> pd.DataFrame:
    """Figure 2's bars: ``rows`` maps a label (e.g. standard_on_d_r) to a model directory;
    robust accuracy at radius ``eps`` (which every listed model must have been evaluated at)."""
    col = robust_column(eps)
    out = []
    by_model = models.set_index("model")
    for label, model_dir in rows.items():
        if model_dir not in by_model.index:
            continue
        m = by_model.loc[model_dir]
        if col not in m or pd.isna(m[col]):
            raise ValueError(f"Figure 2: model {model_dir} has no robust accuracy at eps={eps:g}")
        paper_std, paper_robust = references.FIGURE2.get(label, (None, None))
        out.append({"label": label, "model": model_dir, "std_acc": m["std_acc"],
                    "robust_acc": m[col], "eps": eps,
                    "paper_std_acc": paper_std.value if paper_std else float("nan"),
                    "paper_robust_acc": paper_robust.value if paper_robust else float("nan"),
                    "paper_origin": paper_std.origin if paper_std else ""})
    return pd.DataFrame(out)


def write_tables(metrics_files: Mapping[str, str], constructed_files: Mapping[str, str], data_path: str | Path,
                 figure2_rows: Mapping[str, str], figure2_eps: float, outputs: Mapping[str, str]
                 ) -> dict[str, pd.DataFrame]:
    """Aggregate every metrics.json and construction summary into the CSV tables ``outputs``
    names (keys models, table1, figure2)."""
    metrics = {name: json.loads(Path(path).read_text()) for name, path in metrics_files.items()}
    constructions = {}
    for name, path in constructed_files.items():
        with hdf5.open_artifact(path, kind="constructed") as art:
            constructions[name] = {k: art.attrs.get(k) for k in ("success_rate", "mean_perturbation_norm")}
    with hdf5.open_artifact(data_path, kind="data") as data:
        n_classes = len(data.class_names)
    models = models_table(metrics, constructions)
    tables = {"models": models, "table1": table1(models, n_classes), "figure2": figure2(models, figure2_rows, figure2_eps)}
    for key, df in tables.items():
        path = Path(outputs[key])
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False, float_format="%.4g")
        log.info("%s:\n%s", path, df.to_string(index=False))
    return tables
