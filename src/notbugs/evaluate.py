"""Stage 5, evaluation: one model's standard and PGD robust accuracy on the original test set,
per example (``predictions.h5``) and summarised (``metrics.json``). The tables that compare
models are :mod:`notbugs.tables`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm import tqdm

from notbugs import attacks, hdf5
from notbugs.batches import read_rows, to_float
from notbugs.models import accelerate, file_sha256, load_model
from notbugs.runtime import atomic_write
from notbugs.sampling import balanced_subset, chunk_generator

log = logging.getLogger(__name__)


def attack_settings(eval_cfg: Mapping, eps: float) -> dict:
    """The robust-accuracy attack at radius ``eps`` (PGD: step size factor·ε/steps), as recorded
    beside every robust number."""
    if eval_cfg["attack"] == "autoattack":
        return dict(attack="autoattack", version=eval_cfg["autoattack_version"], norm=eval_cfg["norm"], eps=eps)
    steps = eval_cfg["steps"]
    return dict(attack="pgd", norm=eval_cfg["norm"], eps=eps, steps=steps,
                step_size=eval_cfg["step_size_factor"] * eps / steps, random_start=eval_cfg["random_start"],
                restarts=eval_cfg["restarts"], scored="worst iterate")


def robust_columns(eps: float) -> tuple[str, str]:
    return f"robust_pred_eps{eps:g}", f"adv_norm_eps{eps:g}"


def _attack(model, x, y, eval_cfg: Mapping, eps: float, generator: torch.Generator, n_classes: int):
    """(prediction, perturbation norm, broken) for each example under the configured attack."""
    settings = attack_settings(eval_cfg, eps)
    if settings["attack"] == "autoattack":
        import torchattacks  # an optional dependency (the schema checks it is installed)

        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
        atk = torchattacks.AutoAttack(model, norm={"l2": "L2", "linf": "Linf"}[settings["norm"]], eps=eps,
                                      version=settings["version"], n_classes=n_classes, seed=seed)
        x_adv = atk(x, y).detach()
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        return pred, (x_adv - x).flatten(1).norm(dim=1), pred != y
    del settings["attack"], settings["scored"]
    res = attacks.pgd(model, x, y, targeted=False, worst_iterate=True, generator=generator, **settings)
    return res.prediction, res.perturbation_norm, res.success


def evaluate_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eval_cfg: Mapping,
                   generator: torch.Generator, n_classes: int) -> dict[str, np.ndarray]:
    """Per-example results on one batch: labels, clean prediction, and for every ε the prediction
    on the attack's example and its L2 distance from x.

    Only examples that are still classified correctly are attacked: a misclassified clean image
    is its own adversarial example (distance 0), and an example broken at a smaller ε keeps that
    example at every larger ε (the smaller ball lies inside the larger)."""
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    out = {"labels": y.cpu().numpy(), "clean_pred": clean_pred.cpu().numpy()}
    robust = clean_pred == y
    pred, norm = clean_pred.clone(), torch.zeros(len(y), device=x.device)
    for eps in sorted(eval_cfg["eps"]):
        pred, norm = pred.clone(), norm.clone()
        rows = robust.nonzero().squeeze(1)
        if len(rows):
            p, n, broken = _attack(model, x[rows], y[rows], eval_cfg, eps, generator, n_classes)
            pred[rows], norm[rows] = p, n.float()
            robust[rows] = ~broken
        pred_col, norm_col = robust_columns(eps)
        out[pred_col], out[norm_col] = pred.cpu().numpy(), norm.cpu().numpy()
    return out


def summarize(columns: Mapping[str, np.ndarray], eval_cfg: Mapping) -> dict:
    labels = columns["labels"]
    clean_correct = columns["clean_pred"] == labels
    robust = []
    for eps in eval_cfg["eps"]:
        pred_col, norm_col = robust_columns(eps)
        robust_correct = clean_correct & (columns[pred_col] == labels)
        broken = clean_correct & ~robust_correct  # right when clean, wrong under attack
        robust.append(dict(attack_settings(eval_cfg, eps), robust_acc=float(robust_correct.mean()),
                           mean_breaking_norm=float(columns[norm_col][broken].mean()) if broken.any() else float("nan")))
    return {"n_test": int(len(labels)), "std_acc": float(clean_correct.mean()), "robust": robust}


def write_json(path: str | Path, payload: Mapping) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))


def evaluate_checkpoint(model_path: str | Path, data_path: str | Path, eval_cfg: Mapping,
                        output: str | Path, *, device: torch.device, seed: int, fast: Mapping,
                        predictions: str | Path | None = None) -> dict:
    """Evaluate one checkpoint on the data artifact's test split (a seeded class-balanced subset
    of ``eval_cfg["n_test"]`` rows if that is set, stored as ``test_index``): per-example predictions are streamed batch by batch into
    ``predictions`` (an "evaluation" HDF5 artifact; a killed run resumes after the last finished
    batch), then the summary is written to ``metrics.json``."""
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
        labels = test.labels
        rows = np.arange(len(test))
        if eval_cfg.get("n_test") and eval_cfg["n_test"] < len(test):
            # a seeded class-balanced subset: a split's prefix can be a single class (ImageFolder order)
            rows = balanced_subset(labels, eval_cfg["n_test"], len(data.class_names), seed)
            columns["test_index"] = hdf5.ColumnSpec((), "int64")
        n_test = len(rows)
        writer = hdf5.ChunkedWriter(predictions, n_test, columns, fingerprint, split="test")
        try:
            if writer.rows_done:
                log.info("%s: resuming after %d/%d evaluated rows", model_path, writer.rows_done, n_test)
            bar = tqdm(total=n_test, initial=writer.rows_done, desc="evaluate", unit="img", mininterval=10)
            for lo in range(writer.rows_done, n_test, bs):
                index = rows[lo:lo + bs]
                x = to_float(torch.from_numpy(read_rows(test.images, index))).to(device)
                y = torch.from_numpy(labels[index]).to(device)
                batch = evaluate_batch(model, x, y, eval_cfg, chunk_generator(seed, lo), len(data.class_names))
                if "test_index" in columns:
                    batch["test_index"] = index.astype(np.int64)
                writer.append(batch)
                bar.update(len(y))
                log.info("evaluate: %d/%d rows done", lo + len(y), n_test)
            bar.close()
            result = summarize({name: writer.read_column(name) for name in columns if name != "test_index"}, eval_cfg)
            writer.finish(kind="evaluation", class_names=data.class_names, config={"evaluation": dict(eval_cfg)},
                          seed=seed, source=f"evaluation of {model_path}",
                          extra_attrs={"checkpoint": str(model_path), "std_acc": result["std_acc"]})
        finally:
            writer.close()
    result.update(arch=meta["arch"], epochs=meta["epochs"], train_seconds=meta["train_seconds"],
                  train_fit=meta["train_fit"],
                  adversarial=meta["config"]["train"]["adversarial"],
                  train_precision=meta["config"]["train"].get("precision", "float32"),  # older checkpoints: float32
                  checkpoint=str(model_path),
                  predictions=str(predictions))
    log.info("%s: std %.2f%%, %s", model_path, 100 * result["std_acc"],
             ", ".join(f"robust@{r['eps']:g} {100 * r['robust_acc']:.2f}%" for r in result["robust"]))
    write_json(output, result)
    return result
