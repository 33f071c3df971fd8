"""Stage 3, construct: the paper's training sets, built from a source model's view of the data.

Methods (``method`` in a construction's config):

- ``inversion`` (D_R through a robust source, D_NR through a standard one): for each training
  pair (x, y) start from another randomly drawn training image (or from noise 0.5 + N(0,1)/20)
  and minimise ‖g(z) − g(x)‖₂/‖g(x)‖₂ with normalised L2 steps; label y.
- ``pgd`` (D_rand, D_det, D_other): targeted L2 PGD from δ=0 towards t inside ‖δ‖₂ ≤ ε,
  normalised steps, projection and clamp, keeping the lowest-loss iterate; label t.
- ``leakage`` (control, no model): add a fixed random pattern of norm ε keyed to t; label t.
- ``nontransferable`` (Nakkiran's rebuttal): like ``pgd``, but the attack also *descends* the
  mean loss of independently trained ``ensemble`` models on the true label y, so the examples
  fool the source without carrying features other models would read as t; label t.
- ``relabel`` (Wallace's rebuttal): no perturbation; keep only the training images that a
  briefly trained source gets *wrong*, labelled with its wrong prediction.

Targets ``t``: ``random`` (uniform over all classes, so t = y about 1/C of the time),
``next`` (t = (y+1) mod C) or ``other`` (t = y + U{1..C−1}, never the true label).

Construction streams the data in chunks and appends each finished chunk to a ``.partial``
HDF5 file, so memory does not grow with the dataset and a killed job resumes at the last
finished chunk. Images are float32: uint8 rounding would erase the non-robust perturbation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from notbugs import attacks, hdf5
from notbugs.models import accelerate, file_sha256, load_model
from notbugs.train import to_float

log = logging.getLogger(__name__)

TARGET_SCHEMES = ("random", "next", "other")
METHODS = ("inversion", "pgd", "nontransferable", "leakage", "relabel")


def choose_targets(scheme: str, labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    if scheme == "random":
        return rng.integers(0, n_classes, size=len(labels)).astype(np.int64)
    if scheme == "next":
        return (labels + 1) % n_classes
    if scheme == "other":
        return (labels + rng.integers(1, n_classes, size=len(labels))) % n_classes
    raise ValueError(f"unknown target scheme {scheme!r}; expected one of {TARGET_SCHEMES}")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: every image starts from *another* image."""
    if n < 2:
        raise ValueError("inversion from another image needs at least two training images")
    perm = rng.permutation(n)
    for i in np.flatnonzero(perm == np.arange(n)):
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def leakage_patterns(n_classes: int, shape: tuple[int, ...], eps: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x1EA4])
    patterns = rng.standard_normal((n_classes,) + tuple(shape)).astype(np.float32)
    norms = np.linalg.norm(patterns.reshape(n_classes, -1), axis=1).reshape(-1, *([1] * len(shape)))
    return patterns / norms * eps


def _read_rows(dataset, rows: np.ndarray) -> np.ndarray:
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return dataset[rows[0]:rows[0] + len(rows)]  # a slice: h5py's point selection is slow
    order = np.argsort(rows)
    out = np.empty((len(rows),) + dataset.shape[1:], dtype=dataset.dtype)
    out[order] = dataset[rows[order]]
    return out


def _columns(image_shape: tuple[int, ...]) -> dict[str, hdf5.ColumnSpec]:
    return {
        "images": hdf5.ColumnSpec(image_shape, "float32"),
        "labels": hdf5.ColumnSpec((), "int64"),
        "orig_index": hdf5.ColumnSpec((), "int64"),
        "orig_label": hdf5.ColumnSpec((), "int64"),
        "loss": hdf5.ColumnSpec((), "float32"),
        "perturbation_norm": hdf5.ColumnSpec((), "float32"),
        "target_reached": hdf5.ColumnSpec((), "bool"),
    }


def predict(model: torch.nn.Module, images, batch_size: int = 500, device: torch.device | str = "cpu") -> np.ndarray:
    """The model's class for every image, batch by batch (``images`` may be an h5py dataset)."""
    preds = []
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            x = to_float(torch.from_numpy(np.asarray(images[lo:lo + batch_size]))).to(device)
            preds.append(model(x).argmax(1).cpu().numpy())
    return np.concatenate(preds).astype(np.int64)


def construct(name: str, cfg: Mapping, *, data_path: str | Path, source_checkpoint: str | Path | None,
              output: str | Path, seed: int, device: torch.device, chunk_size: int = 512,
              ensemble_checkpoints: Sequence[str | Path] = (), fast: Mapping | None = None) -> Path:
    """Build construction ``name`` into ``output`` (resuming a matching ``.partial`` file)."""
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"construction {name}: unknown method {method!r}; expected one of {METHODS}")
    source_sha = file_sha256(source_checkpoint) if method != "leakage" else None
    model, others = None, []
    if method != "leakage":
        model = accelerate(load_model(source_checkpoint, device=device)[0], fast)
        others = [accelerate(load_model(path, device=device)[0], fast) for path in ensemble_checkpoints]

    with hdf5.open_artifact(data_path, kind="data") as data:
        train = data.split("train")
        class_names = data.class_names
        n_classes = len(class_names)
        image_shape = tuple(train.images.shape[1:])
        labels = train.labels
        rng = np.random.default_rng([seed, 0xC0257])
        rows = np.arange(len(labels))
        if method == "inversion":
            targets = labels
        elif method == "relabel":
            predictions = predict(model, train.images, chunk_size, device)
            rows = np.flatnonzero(predictions != labels)
            if len(rows) == 0:
                raise ValueError(f"construction {name}: the source classifies every training image correctly, "
                                 "so relabelling keeps nothing; train the source for fewer epochs")
            targets = predictions
        else:
            targets = choose_targets(cfg["target"], labels, n_classes, rng)
        starts = derangement(len(labels), rng) if method == "inversion" and cfg["start"] == "image" else None
        n = len(rows)

        fingerprint = json.dumps({"cfg": cfg, "seed": seed, "chunk": chunk_size, "source": source_sha,
                                  "ensemble": [file_sha256(p) for p in ensemble_checkpoints],
                                  "data": file_sha256(data_path)}, sort_keys=True)
        writer = hdf5.ChunkedWriter(output, n, _columns(image_shape), fingerprint)
        if writer.rows_done:
            log.info("%s: resuming after %d/%d finished rows", name, writer.rows_done, n)
        if method == "leakage":
            patterns = torch.from_numpy(leakage_patterns(n_classes, image_shape, cfg["eps"], seed)).to(device)
        bar = tqdm(total=n, initial=writer.rows_done, desc=f"construct {name}", unit="img", mininterval=10)
        try:
            for lo in range(writer.rows_done, n, chunk_size):
                hi = min(lo + chunk_size, n)
                index = rows[lo:hi]
                x = to_float(torch.from_numpy(_read_rows(train.images, index))).to(device)
                t = torch.from_numpy(targets[index]).to(device)
                if method == "pgd":
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + lo)
                    res = attacks.pgd(model, x, t, eps=cfg["eps"], steps=cfg["steps"], step_size=cfg["step_size"],
                                      norm="l2", targeted=True, keep_best=cfg["keep_best"], generator=gen)
                    x_new, loss, reached, moved = res.x_adv, res.loss, res.success, res.perturbation_norm
                elif method == "nontransferable":
                    y = torch.from_numpy(labels[index]).to(device)
                    res = attacks.nontransferable_pgd(model, others, x, y, t, eps=cfg["eps"], steps=cfg["steps"],
                                                      step_size=cfg["step_size"], weight=cfg.get("ensemble_weight", 1.0),
                                                      keep_best=cfg["keep_best"])
                    x_new, loss, reached, moved = res.x_adv, res.loss, res.success, res.perturbation_norm
                elif method == "inversion":
                    if starts is not None:
                        start = to_float(torch.from_numpy(_read_rows(train.images, starts[lo:hi]))).to(device)
                    else:
                        gen = torch.Generator().manual_seed(seed * 1_000_003 + lo)
                        start = (0.5 + torch.randn(x.shape, generator=gen) / 20).clamp(0, 1).to(device)
                    res = attacks.invert(model, start, x, steps=cfg["steps"], step_size=cfg["step_size"],
                                         tolerance=cfg["tolerance"], step_decay=cfg["step_decay"])
                    x_new, loss, reached, moved = res.x_inv, res.loss, res.reached, res.perturbation_norm
                elif method == "relabel":
                    x_new, moved = x, torch.zeros(len(t), device=device)
                    with torch.no_grad():
                        loss = torch.nn.functional.cross_entropy(model(x), t, reduction="none")
                    reached = torch.ones(len(t), dtype=torch.bool, device=device)
                else:  # leakage
                    x_new = (x + patterns[t]).clamp(0, 1)
                    moved = (x_new - x).flatten(1).norm(dim=1)
                    loss = torch.full((len(t),), float("nan"), device=device)
                    reached = torch.zeros(len(t), dtype=torch.bool, device=device)
                writer.append({
                    "images": x_new.float().cpu().numpy(),
                    "labels": targets[index],
                    "orig_index": index.astype(np.int64),
                    "orig_label": labels[index],
                    "loss": loss.float().cpu().numpy(),
                    "perturbation_norm": moved.float().cpu().numpy(),
                    "target_reached": reached.cpu().numpy(),
                })
                bar.update(hi - lo)
                log.info("%s: %d/%d rows done", name, hi, n)
            bar.close()
            reached_all = writer.read_column("target_reached")
            norms = writer.read_column("perturbation_norm")
            summary = {
                "method": method,
                "attack": json.dumps(dict(cfg)),
                "source_checkpoint": str(source_checkpoint) if source_checkpoint else "",
                "source_sha256": source_sha or "",
                "ensemble_checkpoints": json.dumps([str(p) for p in ensemble_checkpoints]),
                "success_rate": float(reached_all.mean()) if method != "leakage" else float("nan"),
                "mean_perturbation_norm": float(norms.mean()),
                "max_perturbation_norm": float(norms.max()),
                "label_equals_orig_rate": float((targets[rows] == labels[rows]).mean()),
                "rows_kept": n,
                "rows_in_source_set": len(labels),
            }
            log.info("%s: %s", name, {k: v for k, v in summary.items() if k != "attack"})
            return writer.finish(kind="constructed", class_names=class_names, config={name: dict(cfg)},
                                 seed=seed, source=f"{method} construction {name!r}", extra_attrs=summary)
        finally:
            writer.close()
