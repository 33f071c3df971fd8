"""Stage 5, evaluation: standard and L2-PGD robust accuracy on the original test set, and the
aggregation of every model's numbers into the tables under ``results/<dataset>/tables``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from notbugs import attacks, hdf5
from notbugs.train import to_float

log = logging.getLogger(__name__)


def attack_settings(eval_cfg: Mapping, eps: float) -> dict:
    """The robust-accuracy attack at radius ``eps``: step size 2.5·ε/steps unless set."""
    steps = eval_cfg["steps"]
    step_size = eval_cfg.get("step_size_factor", 2.5) * eps / steps
    return dict(norm=eval_cfg.get("norm", "l2"), eps=eps, steps=steps, step_size=step_size,
                random_start=eval_cfg.get("random_start", False), restarts=eval_cfg.get("restarts", 1))


def robust_columns(eps: float) -> tuple[str, str]:
    return f"robust_pred_eps{eps:g}", f"adv_norm_eps{eps:g}"


def evaluate_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eval_cfg: Mapping,
                   generator: torch.Generator) -> dict[str, np.ndarray]:
    """Per-example results on one batch: labels, clean prediction, and for every ε the
    prediction on the PGD example and that example's L2 distance from x."""
    with torch.no_grad():
        out = {"labels": y.cpu().numpy(), "clean_pred": model(x).argmax(1).cpu().numpy()}
    for eps in eval_cfg["eps"]:
        result = attacks.pgd(model, x, y, targeted=False, generator=generator, **attack_settings(eval_cfg, eps))
        pred_col, norm_col = robust_columns(eps)
        out[pred_col] = result.prediction.cpu().numpy()
        out[norm_col] = result.perturbation_norm.float().cpu().numpy()
    return out


def _batch_generator(seed: int, offset: int) -> torch.Generator:
    # Per batch, not one stream for the whole set, so a resumed run draws the same random starts.
    return torch.Generator().manual_seed(seed * 1_000_003 + offset)


def summarize(columns: Mapping[str, np.ndarray], eval_cfg: Mapping) -> dict:
    labels = columns["labels"]
    robust = []
    for eps in eval_cfg["eps"]:
        pred_col, norm_col = robust_columns(eps)
        robust.append(dict(attack_settings(eval_cfg, eps), robust_acc=float((columns[pred_col] == labels).mean()),
                           mean_adv_norm=float(columns[norm_col].mean())))
    return {"n_test": int(len(labels)), "std_acc": float((columns["clean_pred"] == labels).mean()),
            "robust": robust}


def write_json(path: str | Path, payload: Mapping) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


# --------------------------------------------------------------------------- tables

# Reference values (percent) keyed by the default construction names; see
# ../shared/reference/paper-facts.md §4 and §6. "replication" marks non-paper numbers.
PAPER_FIGURE2 = {  # label: (std acc, robust acc at eps=0.25, origin)
    "standard_on_d": (95.3, 4.5, "paper"),
    "adversarial_on_d": (91.0, 82.5, "paper (approx.)"),
    "standard_on_d_r": (84.1, 48.3, "paper"),
    "standard_on_d_nr": (87.7, 0.8, "paper"),
}
PAPER_TABLE1 = {  # train set: (test acc, origin)
    "d": (95.3, "paper"),
    "d_rand": (63.3, "paper"),
    "d_det": (43.7, "paper"),
    "d_other": (67.3, "replication"),
    "d_leak_rand": (79.5, "replication"),
    "d_leak_det": (32.3, "replication"),
}
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
    out["paper_test_acc"] = out.train_set.map(lambda s: PAPER_TABLE1.get(s, (float("nan"),))[0])
    out["paper_origin"] = out.train_set.map(lambda s: PAPER_TABLE1.get(s, (None, ""))[1])
    return out.reset_index(drop=True)


def figure2(models: pd.DataFrame, rows: Mapping[str, str], eps: float = 0.25) -> pd.DataFrame:
    """Figure 2's bars: ``rows`` maps a label (e.g. standard_on_d_r) to a model directory."""
    col = robust_column(eps)
    out = []
    by_model = models.set_index("model")
    for label, model_dir in rows.items():
        if model_dir not in by_model.index:
            continue
        m = by_model.loc[model_dir]
        paper = PAPER_FIGURE2.get(label, (float("nan"), float("nan"), ""))
        out.append({"label": label, "model": model_dir, "std_acc": m["std_acc"],
                    "robust_acc": m.get(col, float("nan")), "eps": eps,
                    "paper_std_acc": paper[0], "paper_robust_acc": paper[1], "paper_origin": paper[2]})
    return pd.DataFrame(out)


def evaluate_checkpoint(model_path: str | Path, data_path: str | Path, eval_cfg: Mapping,
                        output: str | Path, device: torch.device, seed: int = 0,
                        predictions: str | Path | None = None, fast: Mapping | None = None) -> dict:
    """Evaluate one checkpoint on the data artifact's test split: per-example predictions are
    streamed batch by batch into ``predictions`` (an "evaluation" HDF5 artifact; a killed run
    resumes after the last finished batch), then the summary is written to ``metrics.json``."""
    from notbugs.models import accelerate, file_sha256, load_model

    model, meta = load_model(model_path, device=device)
    model = accelerate(model, fast)
    predictions = Path(predictions or Path(output).with_name("predictions.h5"))
    fingerprint = json.dumps({"eval": dict(eval_cfg), "seed": seed, "model": file_sha256(model_path),
                              "data": file_sha256(data_path)}, sort_keys=True, default=str)
    bs = eval_cfg["batch_size"]
    with hdf5.open_artifact(data_path, kind="data") as data:
        test = data.split("test")
        columns = {"labels": hdf5.ColumnSpec((), "int64"), "clean_pred": hdf5.ColumnSpec((), "int64")}
        for eps in eval_cfg["eps"]:
            pred_col, norm_col = robust_columns(eps)
            columns[pred_col], columns[norm_col] = hdf5.ColumnSpec((), "int64"), hdf5.ColumnSpec((), "float32")
        writer = hdf5.ChunkedWriter(predictions, len(test), columns, fingerprint, split="test")
        try:
            if writer.rows_done:
                log.info("%s: resuming after %d/%d evaluated rows", model_path, writer.rows_done, len(test))
            bar = tqdm(total=len(test), initial=writer.rows_done, desc="evaluate", unit="img", mininterval=10)
            for lo, chunk in test.iter_chunks(bs, start=writer.rows_done):
                x = to_float(torch.from_numpy(chunk["images"])).to(device)
                y = torch.from_numpy(chunk["labels"]).to(device)
                writer.append(evaluate_batch(model, x, y, eval_cfg, _batch_generator(seed, lo)))
                bar.update(len(y))
                log.info("evaluate: %d/%d rows done", lo + len(y), len(test))
            bar.close()
            result = summarize({name: writer.read_column(name) for name in columns}, eval_cfg)
            writer.finish(kind="evaluation", class_names=data.class_names, config={"evaluation": dict(eval_cfg)},
                          seed=seed, source=f"evaluation of {model_path}",
                          extra_attrs={"checkpoint": str(model_path), "std_acc": result["std_acc"]})
        finally:
            writer.close()
    train_cfg = meta.get("config", {}).get("train", {})
    result.update(arch=meta["arch"], epochs=meta.get("epochs"), train_seconds=meta.get("train_seconds"),
                  adversarial=train_cfg.get("adversarial"), checkpoint=str(model_path),
                  predictions=str(predictions))
    log.info("%s: std %.2f%%, %s", model_path, 100 * result["std_acc"],
             ", ".join(f"robust@{r['eps']:g} {100 * r['robust_acc']:.2f}%" for r in result["robust"]))
    write_json(output, result)
    return result


def write_tables(metrics_files: Mapping[str, str], constructed_files: Mapping[str, str], data_path: str | Path,
                 figure2_rows: Mapping[str, str], outputs) -> dict[str, pd.DataFrame]:
    """Aggregate every metrics.json and construction summary into the three CSV tables."""
    from notbugs.hdf5 import open_artifact

    metrics = {name: json.loads(Path(path).read_text()) for name, path in metrics_files.items()}
    constructions = {}
    for name, path in constructed_files.items():
        with open_artifact(path, kind="constructed") as art:
            constructions[name] = {k: art.attrs.get(k) for k in ("success_rate", "mean_perturbation_norm")}
    with open_artifact(data_path, kind="data") as data:
        n_classes = len(data.class_names)
    models = models_table(metrics, constructions)
    tables = {"models": models, "table1": table1(models, n_classes), "figure2": figure2(models, figure2_rows)}
    for key, df in tables.items():
        path = Path(getattr(outputs, key))
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False, float_format="%.4g")
        log.info("%s:\n%s", path, df.to_string(index=False))
    return tables
