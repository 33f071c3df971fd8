"""Follow-up studies beyond the paper's headline figures, run on the pipeline's cached artifacts.

- :func:`transfer_table` — paper Fig. 3: does a target architecture learn from D_det in
  proportion to how well the source's adversarial examples transfer to it?
- :func:`certify_linear_features` and :func:`robust_leakage_table` — Goh's robust-feature
  leakage: how much of D_rand/D_det can a classifier learn from the C certified-robust features
  of a robust *linear* model alone?
- :func:`rebuttals_table` — Nakkiran's non-transferable D_det and Wallace's relabelling.
- The Gaussian model of Sec. 4 lives in :mod:`notbugs.gaussian` (it needs no data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from notbugs import attacks, hdf5, references
from notbugs.batches import float_batches
from notbugs.models import attacked_model, accelerate, load_model
from notbugs.runtime import atomic_write
from notbugs.sampling import choose_targets


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# --- Transferability vs learnability -----------------------------------------------------------

def replay_attack(construction: Mapping, source: torch.nn.Module, ensemble: Sequence[torch.nn.Module],
                  x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> attacks.AttackResult:
    """The attack of a pgd or nontransferable construction, on other images. ``ensemble``: the
    models its ``ensemble`` names (a pgd set attacks them with the source, a nontransferable set
    keeps them on y)."""
    kwargs = dict(eps=construction["eps"], steps=construction["steps"], step_size=construction["step_size"],
                  keep_best=construction["keep_best"])
    if construction["method"] == "nontransferable":
        return attacks.nontransferable_pgd(source, list(ensemble), x, y, t, weight=construction["ensemble_weight"],
                                           **kwargs)
    return attacks.pgd(attacked_model(source, ensemble), x, t, targeted=True, **kwargs)


def transfer_rates(source: torch.nn.Module, victims: Mapping[str, torch.nn.Module], images: np.ndarray,
                   labels: np.ndarray, construction: Mapping, n_classes: int, *, seed: int, batch_size: int,
                   device: torch.device | str = "cpu", ensemble: Sequence[torch.nn.Module] = ()) -> dict[str, float]:
    """Replay a construction's attack on ``images`` (test images: no victim was trained on them)
    and return, per victim, the fraction of adversarial examples it classifies as the attack's
    target; ``"source"`` is the attack's own success rate."""
    targets = choose_targets(construction["target"], labels, n_classes, np.random.default_rng([seed, 0x7EA5]))
    hits = {name: 0 for name in ["source", *victims]}
    for lo, x in float_batches(images, batch_size, device):
        t = torch.from_numpy(targets[lo:lo + len(x)]).to(device)
        y = torch.from_numpy(labels[lo:lo + len(x)]).to(device)
        res = replay_attack(construction, source, ensemble, x, y, t)
        hits["source"] += int(res.success.sum())
        with torch.no_grad():
            for name, victim in victims.items():
                hits[name] += int((victim(res.x_adv).argmax(1) == t).sum())
    return {name: count / len(images) for name, count in hits.items()}


def transfer_table(rates: Mapping[str, float], learn_metrics: Mapping[str, Mapping],
                   standard_metrics: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per architecture: transfer rate of the source's examples to the architecture's
    standard model, and the test accuracy of that architecture trained on the constructed set."""
    rows = [{"arch": arch, "transfer_rate": 100 * rates[arch],
             "constructed_set_test_acc": 100 * learn_metrics[arch]["std_acc"],
             "standard_model_test_acc": 100 * standard_metrics[arch]["std_acc"],
             "source_attack_success": 100 * rates["source"]} for arch in learn_metrics]
    table = pd.DataFrame(rows)
    table["pearson_r"] = pearson_r(table.transfer_rate, table.constructed_set_test_acc)
    return table


# --- Robust-feature leakage (Goh) --------------------------------------------------------------

def linear_features(model: torch.nn.Module, image_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with model(x) = W·vec(x) + b for an affine model, read off by autograd in pixel
    space (so the model's internal normalisation is folded in). Raises if the model is not affine."""
    with attacks.frozen(model):
        x = torch.zeros((1, *image_shape), requires_grad=True)
        out = model(x)[0]
        rows = [torch.autograd.grad(out[i], x, retain_graph=True)[0].flatten() for i in range(len(out))]
        weights, bias = torch.stack(rows).double(), out.detach().double()
        probe = torch.rand((4, *image_shape), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = probe.flatten(1).double() @ weights.T + bias
            if not torch.allclose(model(probe).double(), expected, atol=1e-3, rtol=1e-4):
                raise ValueError("the robust-leakage study needs an affine (arch: linear) model")
    return weights.numpy(), bias.numpy()


def flat_pixels(images) -> np.ndarray:
    """Images as float64 pixel vectors, one row each."""
    return np.concatenate([x.flatten(1).double().numpy() for _, x in float_batches(images, 1000)])


def feature_values(weights: np.ndarray, bias: np.ndarray, images) -> np.ndarray:
    return flat_pixels(images) @ weights.T + bias


def worst_case_margin(weights: np.ndarray, bias: np.ndarray, x_flat: np.ndarray, signs: np.ndarray,
                      eps: float) -> np.ndarray:
    """min over ‖δ‖₂ ≤ eps of s·(w·(x+δ) + b) = s·(w·x + b) − eps·‖w‖, per example and feature
    (exact for a linear feature; the [0,1] box can only make the adversary weaker)."""
    return signs * (x_flat @ weights.T + bias) - eps * np.linalg.norm(weights, axis=1)


def certify_linear_features(weights: np.ndarray, bias: np.ndarray, images, labels: np.ndarray,
                            eps: float) -> pd.DataFrame:
    """Per feature i (logit i) and class c (one-vs-rest label s = ±1): its usefulness
    ρ_ic = E[s·f̂_i(x)] and its certified robust usefulness γ_ic = E[min_δ s·f̂_i(x+δ)] =
    ρ_ic − eps·‖w_i‖/σ_i, where f̂_i is the feature standardised on the data (paper Sec. 2).
    ``certified_gamma`` is γ for the feature's own class; Goh's specification 1 asks for γ ≥ 0
    for at least one class (``spec1_best_gamma``, ``spec1_holds``)."""
    values = feature_values(weights, bias, images)
    mean, std = values.mean(0), values.std(0).clip(1e-12)
    n_features = len(weights)
    signs = np.where(labels[:, None] == np.arange(n_features)[None, :], 1.0, -1.0)  # (n, class)
    standardised = (values - mean) / std                                                  # (n, feature)
    usefulness_per_class = standardised.T @ signs / len(labels)                           # (feature, class)
    w_norm = np.linalg.norm(weights, axis=1)
    gamma_per_class = usefulness_per_class - (eps * w_norm / std)[:, None]
    own = np.arange(n_features)
    best = gamma_per_class.max(1)
    return pd.DataFrame({"feature": own, "weight_norm": w_norm, "feature_std": std,
                         "usefulness": usefulness_per_class[own, own], "certified_gamma": gamma_per_class[own, own],
                         "eps": eps, "robustly_useful": gamma_per_class[own, own] > 0,
                         "spec1_best_gamma": best, "spec1_best_class": gamma_per_class.argmax(1),
                         "spec1_holds": best >= 0})


def certified_static(weights: np.ndarray, bias: np.ndarray, x_flat: np.ndarray, eps: float) -> np.ndarray:
    """Per example: can no ‖δ‖₂ ≤ eps change the linear model's prediction p? Exactly when
    (w_p − w_j)·x + b_p − b_j > eps·‖w_p − w_j‖ for every j ≠ p (the [0,1] box only helps)."""
    logits = x_flat @ weights.T + bias
    predicted = logits.argmax(1)
    margins = logits[np.arange(len(logits)), predicted][:, None] - logits                   # (n, class)
    pair_gaps = np.linalg.norm(weights[:, None, :] - weights[None, :, :], axis=2)          # (class, class)
    gaps = pair_gaps[predicted]                                                             # (n, class)
    ok = margins > eps * gaps
    ok[np.arange(len(logits)), predicted] = True
    return ok.all(1)


SPEC2_STATIC_FRACTION = 0.8  # Goh's specification 2: at least 80% of test predictions certified static


def fit_feature_classifier(features: np.ndarray, labels: np.ndarray, n_classes: int, *, steps: int,
                           weight_decay: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised features (full batch, LBFGS).
    Returns (mean, std, W, b) so that logits = ((f − mean)/std)·Wᵀ + b."""
    mean, std = features.mean(0), features.std(0).clip(1e-12)
    z = torch.from_numpy((features - mean) / std)
    y = torch.from_numpy(labels.astype(np.int64))
    W = torch.zeros((n_classes, z.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.T + b, y) + weight_decay * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, W.detach().numpy(), b.detach().numpy()


def feature_classifier_accuracy(fit, features: np.ndarray, labels: np.ndarray) -> float:
    mean, std, W, b = fit
    return float((((features - mean) / std) @ W.T + b).argmax(1).__eq__(labels).mean() * 100)


def robust_leakage_table(weights, bias, train_sets: Mapping[str, tuple], test: tuple, n_classes: int,
                         deep_metrics: Mapping[str, Mapping], steps: int) -> pd.DataFrame:
    """For each training set (images, labels): the test accuracy of a linear classifier trained
    on the robust linear model's C features only, beside the deep target model's accuracy."""
    test_features = feature_values(weights, bias, test[0])
    rows = []
    for name, (images, labels) in train_sets.items():
        fit = fit_feature_classifier(feature_values(weights, bias, images), labels, n_classes, steps=steps)
        rows.append({"train_set": name,
                     "features_only_test_acc": feature_classifier_accuracy(fit, test_features, test[1]),
                     "deep_model_test_acc": 100 * deep_metrics.get(name, {}).get("std_acc", float("nan")),
                     "paper_features_only": references.GOH_FEATURES_ONLY.get(name, float("nan")),
                     "chance": 100 / n_classes})
    return pd.DataFrame(rows)


# --- Rebuttals (Nakkiran, Wallace) ------------------------------------------------------------

def constructed_summary(path: str | Path) -> dict:
    with hdf5.open_artifact(path, kind="constructed") as cons:
        attrs = cons.attrs
    return {"rows": int(attrs.get("rows_kept", -1)), "source_success_rate": 100 * float(attrs["success_rate"]),
            "mean_perturbation_norm": float(attrs["mean_perturbation_norm"])}


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def rebuttals_table(nakkiran: Mapping[str, Mapping], wallace: Mapping) -> pd.DataFrame:
    """``nakkiran``: {train_set: {method, rows, source_success_rate, judge_transfer_rate,
    target_test_acc}}; ``wallace``: {relabeller_test_acc, rows, train_rows, target_test_acc}."""
    rows = [{"study": "nakkiran", "train_set": name, **values,
             "paper_target_test_acc": references.NAKKIRAN_TARGET_TEST_ACC.get(values["method"], float("nan"))}
            for name, values in nakkiran.items()]
    rows.append({"study": "wallace", "train_set": wallace["train_set"], "method": "relabel",
                 "rows": wallace["rows"], "kept_fraction": 100 * wallace["rows"] / wallace["train_rows"],
                 "relabeller_test_acc": wallace["relabeller_test_acc"],
                 "target_test_acc": wallace["target_test_acc"],
                 "paper_target_test_acc": references.WALLACE["target_test_acc"],
                 "paper_relabeller_test_acc": references.WALLACE["relabeller_test_acc"],
                 "paper_kept_fraction": references.WALLACE["kept_fraction"]})
    return pd.DataFrame(rows)


# --- The study rules: paths in, tables out ------------------------------------------------------

def transfer_study(*, source_path, standard_paths: Mapping[str, str], learned_metrics: Mapping[str, str],
                   standard_metrics: Mapping[str, str], data_path, construction: Mapping, fast: Mapping,
                   seed: int, batch_size: int, device: torch.device | str = "cpu",
                   ensemble_paths: Sequence[str] = ()) -> pd.DataFrame:
    """Paper Fig. 3: ``*_paths`` / ``*_metrics`` map an architecture to its standard model's
    checkpoint and to the metrics.json of its standard model and of its model trained on the
    constructed set whose attack (``construction``, with the models of its ``ensemble`` in
    ``ensemble_paths``) is replayed on the test images."""
    source = accelerate(load_model(source_path, device=device)[0], fast)
    ensemble = [accelerate(load_model(p, device=device)[0], fast) for p in ensemble_paths]
    victims = {arch: accelerate(load_model(path, device=device)[0], fast) for arch, path in standard_paths.items()}
    with hdf5.open_artifact(data_path, kind="data") as data:
        test, n_classes = data.split("test"), len(data.class_names)
        rates = transfer_rates(source, victims, test.images[:], test.labels, construction, n_classes,
                               seed=seed, batch_size=batch_size, device=device, ensemble=ensemble)
    return transfer_table(rates, {a: read_metrics(p) for a, p in learned_metrics.items()},
                          {a: read_metrics(p) for a, p in standard_metrics.items()})


def robust_leakage_study(*, linear_path, data_path, constructed: Mapping[str, str], deep_metrics: Mapping[str, str],
                         eps: float, feature_epochs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Goh's leakage study: (accuracy table, per-feature certificate table) for the robust linear
    model ``linear_path``, the constructed sets ``constructed`` (name → file) and the deep
    targets' metrics.json files. Both of Goh's specifications are checked (1 on the training
    images, 2 on the test images); the accuracy table says whether they hold (``premises_hold``):
    if not, its numbers do not measure leakage through *robust* features."""
    model, _ = load_model(linear_path)
    with hdf5.open_artifact(data_path, kind="data") as data:
        train, test = data.split("train"), data.split("test")
        n_classes, image_shape = len(data.class_names), train.images.shape[1:]
        weights, bias = linear_features(model, image_shape)
        features = certify_linear_features(weights, bias, train.images[:], train.labels, eps)
        static = float(certified_static(weights, bias, flat_pixels(test.images[:]), eps).mean())
        sets = {"d": (train.images[:], train.labels)}
        for name, path in constructed.items():
            sets[name] = hdf5.load_split(path, "train", kind="constructed")
        table = robust_leakage_table(weights, bias, sets, (test.images[:], test.labels), n_classes,
                                     {n: read_metrics(p) for n, p in deep_metrics.items()}, steps=feature_epochs)
    table["spec1_features_holding"] = int(features.spec1_holds.sum())
    table["spec2_static_fraction"] = 100 * static
    table["premises_hold"] = bool(features.spec1_holds.all()) and static >= SPEC2_STATIC_FRACTION
    return table, features


def rebuttals_study(*, judge_path, source_path, ensemble_paths: Sequence[str], constructed: Mapping[str, str],
                    constructions: Mapping[str, Mapping], learned_metrics: Mapping[str, str], relabelled_path,
                    relabel_metrics, relabeller_metrics, data_path, fast: Mapping, seed: int, batch_size: int,
                    device: torch.device | str = "cpu") -> pd.DataFrame:
    """Nakkiran and Wallace: ``constructed`` / ``constructions`` / ``learned_metrics`` map each of
    the plain and the non-transferable set to its file, its config and its target's
    metrics.json. Transfer is measured as in the transfer study: each set's attack is replayed on
    the *test* images, which the judge (a fresh model trained on D that took no part in either
    attack) never saw, and the judge's rate of reading them as the target is reported."""
    judge = accelerate(load_model(judge_path, device=device)[0], fast)
    source = accelerate(load_model(source_path, device=device)[0], fast)
    ensemble = [accelerate(load_model(p, device=device)[0], fast) for p in ensemble_paths]
    with hdf5.open_artifact(data_path, kind="data") as data:
        train_rows, test, n_classes = len(data.split("train")), data.split("test"), len(data.class_names)
        test_images, test_labels = test.images[:], test.labels
    nakkiran = {}
    for name, path in constructed.items():
        cfg = constructions[name]
        # the plain set attacks its source alone (rebuttal_sets), the fresh models are the
        # non-transferable attack's
        rates = transfer_rates(source, {"judge": judge}, test_images, test_labels, cfg, n_classes, seed=seed,
                               batch_size=batch_size, device=device,
                               ensemble=ensemble if cfg["method"] == "nontransferable" else ())
        nakkiran[name] = {"method": cfg["method"], **constructed_summary(path),
                          "test_source_success_rate": 100 * rates["source"],
                          "judge_transfer_rate": 100 * rates["judge"],
                          "target_test_acc": 100 * read_metrics(learned_metrics[name])["std_acc"]}
    wallace = {"train_set": Path(relabelled_path).stem, "rows": constructed_summary(relabelled_path)["rows"],
               "train_rows": train_rows,
               "relabeller_test_acc": 100 * read_metrics(relabeller_metrics)["std_acc"],
               "target_test_acc": 100 * read_metrics(relabel_metrics)["std_acc"]}
    return rebuttals_table(nakkiran, wallace)


def write_table(table: pd.DataFrame, path) -> None:
    with atomic_write(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
