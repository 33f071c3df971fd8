"""The follow-up studies: Goh's certificate, Nakkiran's and Wallace's constructions, transfer
rates, and the config switches that add what each study needs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, construction_config, fast_paths, make_data_artifact, train_tiny_model
from notbugs import attacks, construct, hdf5, studies
from notbugs.batches import predict
from notbugs.config import ConfigError, validate_config
from notbugs.models import build_model, load_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------- Goh's certificate

def _linear_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("linear", 10, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    return model.eval()


def test_linear_features_reproduce_the_model_including_its_normalisation():
    model = _linear_model()
    weights, bias = studies.linear_features(model, SHAPE)
    x = torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).double().numpy()
    np.testing.assert_allclose(studies.feature_values(weights, bias, x.numpy()), expected, rtol=1e-6, atol=1e-6)


def test_linear_features_reject_a_nonlinear_model():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="affine"):
        studies.linear_features(build_model("small_cnn", 10, [0.5] * 3, [0.25] * 3).eval(), SHAPE)


@pytest.mark.parametrize("eps", [0.25, 0.5])
def test_certified_worst_case_equals_pgd_on_the_linear_model(eps):
    """PGD on each feature of the linear model reaches the analytic bound s·f(x) − ε‖w‖ within 1e-4.
    Images lie in [0.25, 0.75] and the worst δ spreads over 3072 pixels, so the [0,1] box never binds."""
    model = _linear_model()
    weights, bias = studies.linear_features(model, SHAPE)
    gen = torch.Generator().manual_seed(2)
    x = 0.25 + 0.5 * torch.rand((6, *SHAPE), generator=gen)
    labels = np.arange(6) % 10
    for i in range(10):
        signs = np.where(labels == i, 1.0, -1.0)
        s = torch.from_numpy(signs).float()

        def margin(z, i=i, s=s):
            return s * model(z)[:, i]

        with attacks.frozen(model):
            x_adv, reached = attacks.descend(x, margin, attacks.L2Ball(eps, 0.1), steps=20)
        analytic = studies.worst_case_margin(weights[i:i + 1], bias[i:i + 1], x.flatten(1).double().numpy(),
                                             signs[:, None], eps)[:, 0]
        np.testing.assert_allclose(reached.double().numpy(), analytic, atol=1e-4, rtol=0)
        # and no point of the ball does better than the bound: a random feasible δ stays above it
        delta = torch.randn(x.shape, generator=gen)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
        with torch.no_grad():
            assert (margin(x + delta).double().numpy() >= analytic - 1e-4).all()


def test_certified_gamma_is_mean_worst_case_of_the_standardised_feature():
    model = _linear_model(3)
    weights, bias = studies.linear_features(model, SHAPE)
    images = torch.rand((300, *SHAPE), generator=torch.Generator().manual_seed(4)).numpy()
    labels = np.random.default_rng(0).integers(0, 10, 300)
    table = studies.certify_linear_features(weights, bias, images, labels, eps=0.25)
    values = studies.feature_values(weights, bias, images)
    mean, std = values.mean(0), values.std(0)
    signs = np.where(labels[:, None] == np.arange(10), 1.0, -1.0)
    worst = studies.worst_case_margin(weights / std[:, None], (bias - mean) / std, images.reshape(300, -1),
                                      signs, 0.25)
    np.testing.assert_allclose(table.certified_gamma, worst.mean(0), rtol=1e-9, atol=1e-9)
    assert (table.certified_gamma < table.usefulness).all()


def test_feature_classifier_learns_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    features = np.eye(4)[labels] * 3 + rng.normal(0, 0.3, (400, 4))
    fit = studies.fit_feature_classifier(features, labels, 4, steps=200)
    assert studies.feature_classifier_accuracy(fit, features, labels) > 99
    shuffled = rng.permutation(labels)
    assert studies.feature_classifier_accuracy(fit, features, shuffled) < 50


def test_spec1_is_the_best_class_of_the_per_class_certificate():
    rng = np.random.default_rng(2)
    weights, bias = rng.standard_normal((4, 12)), rng.standard_normal(4)
    images = torch.from_numpy(rng.random((300, 12)).astype(np.float32))
    labels = rng.integers(0, 4, 300)
    table = studies.certify_linear_features(weights, bias, images, labels, eps=0.1)
    values = images.double().numpy() @ weights.T + bias
    z = (values - values.mean(0)) / values.std(0)
    for i in range(4):
        per_class = [np.mean(np.where(labels == c, 1, -1) * z[:, i]) - 0.1 * np.linalg.norm(weights[i]) / values[:, i].std()
                     for c in range(4)]
        assert table.spec1_best_gamma[i] == pytest.approx(max(per_class))
        assert table.spec1_best_class[i] == int(np.argmax(per_class))
        assert table.certified_gamma[i] == pytest.approx(per_class[i])
    assert (table.spec1_holds == (table.spec1_best_gamma >= 0)).all()


def test_spec2_certificate_equals_a_brute_force_search_on_a_small_linear_model():
    """In 2-D the whole sphere of radius eps can be scanned: a prediction is certified static
    exactly when no point of the scan (nor the ball inside) changes it."""
    rng = np.random.default_rng(5)
    weights, bias = rng.standard_normal((3, 2)), rng.standard_normal(3) * 0.3
    x = rng.uniform(-1, 1, (400, 2))
    eps = 0.3
    certified = studies.certified_static(weights, bias, x, eps)
    angles = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    circle = eps * np.stack([np.cos(angles), np.sin(angles)], 1)
    radii = np.linspace(0, 1, 21)[:, None, None] * circle[None]           # the ball, in shells
    moved = x[:, None, None, :] + radii.reshape(1, -1, 2)[:, :, None, :]   # (n, points, 1, 2)
    predictions = (moved[..., 0, :] @ weights.T + bias).argmax(-1)        # (n, points)
    brute = (predictions == (x @ weights.T + bias).argmax(1)[:, None]).all(1)
    np.testing.assert_array_equal(certified, brute)
    assert 0 < certified.mean() < 1  # both kinds of points occur


# --------------------------------------------------------------------------- the rebuttals

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuttals")
    data_path = make_data_artifact(root / "data.h5", n_train=600, n_test=200)
    # 10 epochs: weaker models barely transfer even plain PGD (measured: 5% at 4 epochs, 39% at 10)
    paths = {name: train_tiny_model(data_path, root / name, epochs=10, seed=seed)
             for name, seed in [("source", 0), ("fresh_1", 11), ("fresh_2", 12), ("judge", 13)]}
    paths["brief"] = train_tiny_model(data_path, root / "brief", epochs=1, seed=5)
    return root, data_path, paths


def _build(root, data_path, paths, name, cfg, ensemble=()):
    cfg = construction_config(**{"source": "source", **cfg, **({"ensemble": list(ensemble)} if ensemble else {})})
    return construct.construct(name, cfg, data_path=data_path, source_checkpoint=paths[cfg["source"]],
                               output=root / f"{name}.h5", seed=0, device=torch.device("cpu"), chunk_size=256,
                               ensemble_checkpoints=[paths[e] for e in ensemble], fast=fast_paths())


def test_nontransferable_examples_transfer_less_than_plain_pgd(tiny_models, tmp_path):
    root, data_path, paths = tiny_models
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"std_acc": 0.5}')  # the targets' accuracies are not what this test checks
    attack = dict(target="next", eps=0.5, steps=30, step_size=0.1, keep_best=True)
    # Weight 8: on these small models, measured on *test* images, weight 4 left the judge reading
    # 31.5% of the non-transferable examples as t against 36.5% of the plain ones.
    plain = _build(root, data_path, paths, "plain", dict(attack, method="pgd"))
    nontransferable = _build(root, data_path, paths, "nt", dict(attack, method="nontransferable", ensemble_weight=8.0),
                             ensemble=("fresh_1", "fresh_2"))
    table = studies.rebuttals_study(
        judge_path=paths["judge"], source_path=paths["source"], ensemble_paths=[paths["fresh_1"], paths["fresh_2"]],
        constructed={"plain": plain, "nt": nontransferable},
        constructions={"plain": construction_config(method="pgd", source="source", **attack),
                       "nt": construction_config(method="nontransferable", source="source", ensemble=["fresh_1", "fresh_2"],
                                                 ensemble_weight=8.0, **attack)},
        learned_metrics={"plain": metrics, "nt": metrics}, relabelled_path=plain, relabel_metrics=metrics,
        relabeller_metrics=metrics, data_path=data_path, fast=fast_paths(), seed=0, batch_size=500)
    rows = table[table.study == "nakkiran"].set_index("train_set")
    # measured on the test images, which the judge never trained on
    assert rows.loc["nt", "test_source_success_rate"] > 90 and rows.loc["plain", "test_source_success_rate"] > 90
    assert rows.loc["nt", "judge_transfer_rate"] < rows.loc["plain", "judge_transfer_rate"] - 5, rows
    summary_plain, summary_nt = studies.constructed_summary(plain), studies.constructed_summary(nontransferable)
    assert summary_nt["source_success_rate"] > 90, summary_nt  # it still fools the source
    assert summary_plain["source_success_rate"] > 90, summary_plain
    with hdf5.open_artifact(nontransferable) as art:
        split = art.split("train")
        assert split["perturbation_norm"][:].max() <= 0.5 + 1e-4
        np.testing.assert_array_equal(split.labels, (split["orig_label"][:] + 1) % 10)


def test_relabel_keeps_exactly_the_wrong_predictions(tiny_models):
    root, data_path, paths = tiny_models
    out = _build(root, data_path, paths, "relabel", {"method": "relabel", "source": "brief"})
    brief, _ = load_model(paths["brief"])
    images, labels = hdf5.load_split(data_path, "train")
    predictions = predict(brief, images, 500)
    wrong = np.flatnonzero(predictions != labels)
    assert 0 < len(wrong) < len(labels)
    with hdf5.open_artifact(out, kind="constructed") as art:
        split = art.split("train")
        np.testing.assert_array_equal(split["orig_index"][:], wrong)
        np.testing.assert_array_equal(split.labels, predictions[wrong])
        assert (split.labels != split["orig_label"][:]).all()
        np.testing.assert_array_equal(split.images[:], images[wrong].astype(np.float32))
        assert art.attrs["rows_kept"] == len(wrong)


def test_transfer_rate_to_the_source_itself_is_the_attack_success(tiny_models):
    _, data_path, paths = tiny_models
    source, _ = load_model(paths["source"])
    judge, _ = load_model(paths["judge"])
    images, labels = hdf5.load_split(data_path, "test")
    cfg = dict(method="pgd", target="next", eps=0.5, steps=10, step_size=0.1, keep_best=True)
    rates = studies.transfer_rates(source, {"self": source, "judge": judge}, images[:100], labels[:100], cfg, 10,
                                   seed=0, batch_size=40)
    assert rates["self"] == rates["source"] > 0.5
    assert 0 <= rates["judge"] <= 1


def test_the_transfer_replay_of_an_ensemble_pgd_set_attacks_the_mean_of_its_models(tiny_models):
    from notbugs.batches import to_float
    from notbugs.models import MeanLogits
    _, data_path, paths = tiny_models
    source, fresh_1, fresh_2 = (load_model(paths[n])[0] for n in ("source", "fresh_1", "fresh_2"))
    images, labels = hdf5.load_split(data_path, "test")
    x, y = to_float(torch.from_numpy(images[:60])), torch.from_numpy(labels[:60])
    t = (y + 1) % 10
    cfg = dict(method="pgd", target="next", eps=0.5, steps=10, step_size=0.1, keep_best=True)
    res = studies.replay_attack(cfg, source, [fresh_1, fresh_2], x, y, t)
    with torch.no_grad():
        mean_reads = MeanLogits([source, fresh_1, fresh_2])(res.x_adv).argmax(1)
    torch.testing.assert_close(res.success, mean_reads == t)
    alone = studies.replay_attack(cfg, source, [], x, y, t)
    assert not torch.equal(alone.x_adv, res.x_adv)


def test_pearson_r():
    assert studies.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert studies.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(studies.pearson_r([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------- config switches

def _config(**studies_on):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["studies"] = {name: dict(enabled=True, **extra) for name, extra in studies_on.items()}
    return config


def test_studies_are_off_by_default_and_add_nothing():
    config = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()), SCHEMA)
    assert not any(study["enabled"] for study in config["studies"].values())
    assert "linear_robust" not in config["sources"] and "d_relabel" not in config["constructions"]


def test_enabling_studies_adds_their_sources_constructions_and_training_sets():
    config = validate_config(_config(transfer={}, robust_leakage={}, gaussian={}, rebuttals={"fresh_models": 2}),
                             SCHEMA)
    assert config["sources"]["linear_robust"]["arch"] == "linear"
    assert config["sources"]["linear_robust"]["train"]["adversarial"]["eps"] == 0.25
    seeds = [config["sources"][f"fresh_{i}"]["seed"] for i in (1, 2, 3)]
    assert len(set(seeds)) == 3 and config["seed"] not in seeds
    nt = config["constructions"]["d_det_nontransferable"]
    assert nt["method"] == "nontransferable" and nt["ensemble"] == ["fresh_1", "fresh_2"]  # fresh_3 judges
    assert nt["eps"] == config["constructions"]["d_det"]["eps"] and nt["target"] == "next"
    assert config["sources"]["brief"]["train"]["epochs"] == 2
    assert {"d_det_nontransferable", "d_relabel"} <= set(config["targets"]["train_sets"])


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["studies"].update(transfer={"enabled": True, "construction": "d_r"}), "studies.transfer.construction"),
    (lambda c: c["studies"].update(rebuttals={"enabled": True, "construction": "nope"}), "studies.rebuttals.construction"),
    (lambda c: c["sources"].update(brief={"arch": "mlp"}), "sources.brief"),
    (lambda c: c["studies"].update(robust_leakage={"enabled": True, "constructions": ["d_x"]}),
     "studies.robust_leakage.constructions.0"),
])
def test_bad_study_configs_name_the_key(edit, key):
    config = _config(rebuttals={})
    edit(config)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(copy.deepcopy(config), SCHEMA)
