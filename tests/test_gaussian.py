"""Tests of notbugs.gaussian: the exact robust accuracy of linear classifiers (against Monte
Carlo with the explicit worst-case perturbation), the Stein closed form of the population robust
logistic optimum (against direct LBFGS minimisation and the isotropic formula), finite-sample
fits, the study's three claims, and the shape of ``run_study``'s tables.

Everything is float64 and CPU-light (the whole file takes a few seconds).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from notbugs import gaussian as g
from notbugs.config import complete

DIM = 10
MEAN_NORM = 2.0


def problem(condition_number: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    rot = g.random_rotation(DIM, rng)
    mu = rng.standard_normal(DIM)
    mu *= MEAN_NORM / np.linalg.norm(mu)
    return mu, g.make_covariance(rot, condition_number, mu), rng


@pytest.fixture(scope="module")
def study():
    return g.run_study(complete("studies.gaussian"), seed=0)


# --------------------------------------------------------------------------- setup sanity

def test_covariance_is_rotated_anisotropic_and_normalised():
    mu, sigma, _ = problem(50.0)
    vals = np.linalg.eigvalsh(sigma)
    assert vals.max() / vals.min() == pytest.approx(50.0, rel=1e-10)
    off = sigma - np.diag(np.diag(sigma))
    assert np.abs(off).max() > 0.1 * np.abs(np.diag(sigma)).max()      # eigenbasis ≠ axes
    assert mu @ np.linalg.solve(sigma, mu) == pytest.approx(MEAN_NORM ** 2, rel=1e-12)
    rot = g.random_rotation(DIM, np.random.default_rng(3))
    assert np.allclose(rot @ rot.T, np.eye(DIM), atol=1e-12) and np.linalg.det(rot) > 0


def test_quadrature_matches_fine_trapezoid_at_the_operating_point():
    """Gauss–Hermite expectations of ℓ, ℓ', ℓ'' agree with a fine trapezoid rule (exponentially
    accurate for these analytic integrands) at the margin moments actually used."""
    mu, sigma, _ = problem(50.0)
    xi, p = g.normal_nodes()
    h = 1e-3
    grid = np.arange(-40.0, 40.0 + h / 2, h)
    dens = np.exp(-grid ** 2 / 2) * h / math.sqrt(2 * math.pi)
    for eps in (0.0, 0.25, 1.0):
        w = g.closed_form_direction(mu, sigma, eps).w
        mean, sd = g.margin_moments(w, mu, sigma, eps)
        for f in (g._softplus_neg, g._dloss, g._d2loss):
            ref = dens @ f(mean + sd * grid)
            assert p @ f(mean + sd * xi) == pytest.approx(ref, rel=1e-9)


# --------------------------------------------------------------------------- 1. exact robust accuracy

@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0])
def test_closed_form_robust_accuracy_matches_monte_carlo(eps):
    mu, sigma, rng = problem(20.0, seed=1)
    w = 3.0 * (g.ridge_direction(mu, sigma, 0.05) + 0.3 * rng.standard_normal(DIM))
    assert abs(np.linalg.norm(w) - 1.0) > 0.5                  # a non-unit w: the ‖w‖ matters
    x, y = g.sample_gaussian(mu, sigma, 200_000, rng)
    delta = -eps * y[:, None] * w / np.linalg.norm(w)
    assert np.allclose(np.linalg.norm(delta, axis=1), eps)
    correct = np.sign((x + delta) @ w) == y
    # the explicit δ attains the formula's worst-case margin y wᵀx − ε‖w‖ sample by sample
    assert np.allclose(y * ((x + delta) @ w), y * (x @ w) - eps * np.linalg.norm(w))
    pred = g.accuracy(w, mu, sigma, eps)
    se = math.sqrt(pred * (1 - pred) / len(y))
    assert 0.55 < pred < 0.99
    assert abs(correct.mean() - pred) < 3 * se
    if eps > 0:   # random perturbations of the same norm do strictly less damage
        rand = rng.standard_normal(x.shape)
        rand *= eps / np.linalg.norm(rand, axis=1, keepdims=True)
        assert (np.sign((x + rand) @ w) == y).mean() > correct.mean() + 10 * se


def test_standard_classifier_robust_accuracy_formula():
    """With Mahalanobis norm ‖μ‖: robust accuracy of Σ⁻¹μ is Φ(‖μ‖ − ε/cos(Σ⁻¹μ, μ))."""
    mu, sigma, _ = problem(100.0)
    cos = 1.0 - g.misalignment(mu, sigma)
    for eps in (0.25, 1.0):
        assert g.accuracy(np.linalg.solve(sigma, mu), mu, sigma, eps) == pytest.approx(
            g.normal_cdf(MEAN_NORM - eps / cos), rel=1e-12)


# --------------------------------------------------------------------------- 2. Stein closed form

def test_analytic_gradients_match_autograd():
    mu, sigma, rng = problem(20.0)
    xi, p = (torch.tensor(a) for a in g.normal_nodes())
    z = torch.tensor(rng.standard_normal((50, DIM)) + mu)
    for eps in (0.0, 0.7):
        w = torch.tensor(rng.standard_normal(DIM), requires_grad=True)
        for fn in (lambda v, e=eps: g.population_loss_and_grad(v, torch.tensor(mu),
                                                               torch.tensor(sigma), e, xi, p),
                   lambda v, e=eps: g.sample_loss_and_grad(v, z, e)):
            _loss, grad = fn(w.detach())
            fn(w)[0].backward()
            assert torch.allclose(grad, w.grad, rtol=1e-10, atol=1e-14)
            w.grad = None


@pytest.mark.parametrize("eps", [0.25, 1.0, 1.5])
def test_population_fit_equals_closed_form(eps):
    mu, sigma, _ = problem(100.0)
    w_pop = g.fit_population(mu, sigma, eps)
    cf = g.closed_form_direction(mu, sigma, eps)
    assert g.cosine(w_pop, cf.w) > 1 - 1e-8
    assert np.linalg.norm(w_pop) == pytest.approx(cf.scale, rel=1e-6)
    assert g.implied_kappa(w_pop, mu, sigma, eps) == pytest.approx(cf.kappa, rel=1e-4)
    assert g.stein_residual(w_pop, mu, sigma, eps) < 1e-6
    assert g.robust_risk(w_pop, mu, sigma, eps) == pytest.approx(cf.risk, rel=1e-12)
    # teeth: the robust direction is far from the standard one and κ is substantial
    assert g.cosine(cf.w, np.linalg.solve(sigma, mu)) < 0.999 and cf.kappa > 0.05
    # it is the minimum along the ridge path (the golden-section formulation gives the same)
    for k in (0.5 * cf.kappa, 0.9 * cf.kappa, 1.1 * cf.kappa, 2.0 * cf.kappa):
        v = g.ridge_direction(mu, sigma, k)
        assert g.robust_risk(g.optimal_scale(v, mu, sigma, eps) * v, mu, sigma, eps) > cf.risk
    # robust accuracy at ε below 1/2 for κ=0 (ε=1.5 here): the bracket's +inf branch is exercised
    if eps == 1.5:
        assert g.accuracy(np.linalg.solve(sigma, mu), mu, sigma, eps) < 0.5


def test_standard_fit_is_twice_sigma_inverse_mu():
    mu, sigma, _ = problem(100.0)
    target = 2.0 * np.linalg.solve(sigma, mu)            # the Bayes posterior is logistic
    w_pop = g.fit_population(mu, sigma, 0.0)
    cf = g.closed_form_direction(mu, sigma, 0.0)
    assert cf.kappa == 0.0
    assert g.cosine(w_pop, target) > 1 - 1e-12
    assert np.allclose(w_pop, target, rtol=1e-7)
    assert np.allclose(cf.w, target, rtol=1e-9)
    assert g.implied_kappa(w_pop, mu, sigma, 0.0) == 0.0


@pytest.mark.parametrize("eps", [0.25, 1.0, 1.9])
def test_isotropic_kappa_is_explicit(eps):
    """Σ = σ²I: κ = εσ²/(‖μ‖ − ε) exactly (independent of the loss)."""
    mu, _, _ = problem(1.0)
    sigma = 0.7 * np.eye(DIM)
    cf = g.closed_form_direction(mu, sigma, eps)
    assert cf.kappa == pytest.approx(eps * 0.7 / (MEAN_NORM - eps), rel=1e-9)
    w_pop = g.fit_population(mu, sigma, eps)
    assert g.implied_kappa(w_pop, mu, sigma, eps) == pytest.approx(cf.kappa, rel=1e-6)
    assert g.cosine(w_pop, mu) > 1 - 1e-12


def test_closed_form_rejects_eps_beyond_mean_norm():
    mu, sigma, _ = problem(10.0)
    with pytest.raises(ValueError):
        g.closed_form_direction(mu, sigma, MEAN_NORM)


# --------------------------------------------------------------------------- 3. finite samples

@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_sample_fit_close_to_population_fit(eps):
    mu, sigma, rng = problem(50.0, seed=2)
    x, y = g.sample_gaussian(mu, sigma, 20_000, rng)
    w_smp = g.fit_samples(x, y, eps)
    w_pop = g.fit_population(mu, sigma, eps)
    assert g.cosine(w_smp, w_pop) > 0.99
    assert np.linalg.norm(w_smp) == pytest.approx(np.linalg.norm(w_pop), rel=0.1)
    if eps > 0:
        assert g.implied_kappa(w_smp, mu, sigma, eps) == pytest.approx(
            g.implied_kappa(w_pop, mu, sigma, eps), rel=0.1)
    # and it is a stationary point of the sample objective
    _, grad = g.sample_loss_and_grad(torch.tensor(w_smp), torch.tensor(y[:, None] * x), eps)
    assert float(grad.abs().max()) < 1e-8


# --------------------------------------------------------------------------- 4. the claims

def test_robust_fits_align_with_mu_and_have_better_conditioned_metric(study):
    fits = study["fits"]
    for c, grp in fits.groupby("condition_number"):
        grp = grp.sort_values("eps")
        if c == 1:
            assert np.allclose(grp["cos_w_mu"], 1.0) and np.allclose(grp["metric_cond_ratio"], 1.0)
            continue
        # gradient alignment cos(w, μ): strictly increasing with ε (ε = 0 is the standard fit)
        assert np.all(np.diff(grp["cos_w_mu"]) > 0)
        assert np.all(np.diff(grp["cos_w_mu_sample"]) > 0)
        # the effective metric Σ + κI is better conditioned, more so for larger ε
        assert grp["metric_cond_ratio"].iloc[0] == pytest.approx(1.0)
        assert np.all(np.diff(grp["metric_cond_ratio"]) < 0)
        assert np.all(grp["metric_cond"].iloc[1:] < c)


def test_kappa_increases_with_eps(study):
    for _, grp in study["fits"].groupby("condition_number"):
        grp = grp.sort_values("eps")
        assert grp["kappa_closed_form"].iloc[0] == 0.0
        assert np.all(np.diff(grp["kappa_closed_form"]) > 0)
        assert np.all(np.diff(grp["kappa_sample"]) > 0)
        assert np.allclose(grp["kappa_population"], grp["kappa_closed_form"], rtol=1e-6)


def test_standard_vulnerability_grows_with_misalignment(study):
    mis = study["misalignment"]
    for eps, grp in mis.groupby("eps"):
        grp = grp.sort_values("condition_number")
        assert np.all(np.diff(grp["misalignment"]) > 0)
        if eps == 0:
            assert np.allclose(grp["vulnerability_standard"], 0.0)
            assert np.allclose(grp["vulnerability_robust"], 0.0)
            continue
        assert np.all(np.diff(grp["vulnerability_standard"]) > 0)
        # clean accuracy of the standard classifier is the same (Bayes) for every c
        assert np.allclose(grp["clean_acc_standard"], g.normal_cdf(MEAN_NORM))
        # robust training: smaller gap and higher robust accuracy once Σ is anisotropic
        aniso = grp[grp["condition_number"] > 1]
        assert np.all(aniso["vulnerability_robust"] < aniso["vulnerability_standard"])
        assert np.all(aniso["robust_acc_robust"] > aniso["robust_acc_standard"])


# --------------------------------------------------------------------------- 5. run_study tables

def test_run_study_tables(study):
    doc = g.__doc__
    expected = {"fits": (g.FITS_COLUMNS, 7 * 4), "misalignment": (g.MISALIGNMENT_COLUMNS, 7 * 4),
                "eigen": (g.EIGEN_COLUMNS, 7 * 4 * 10)}
    assert set(study) == set(expected)
    for name, (columns, rows) in expected.items():
        df = study[name]
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == columns and len(df) == rows
        assert not df.isna().any().any() and np.isfinite(df.to_numpy(float)).all()
        assert f"``{name}``" in doc
        for col in columns:                                 # every column is documented
            assert re.search(rf"``{col}``", doc), col
    fits = study["fits"]
    assert (fits["cos_sample_closed_form"] > 0.99).all()
    assert (fits["cos_population_closed_form"] > 1 - 1e-8).all()
    assert (fits["stein_residual"] < 1e-6).all()
    eig = study["eigen"]
    sums = eig.groupby(["condition_number", "eps"])[["sigma_eig", "metric_eig"]].sum()
    assert np.allclose(sums, 10.0)
    top = eig[eig["index"] == 0].set_index(["condition_number", "eps"])
    assert np.all(top["metric_eig"] <= top["sigma_eig"] + 1e-12)   # flatter spectrum


def test_run_study_seeded_and_configurable():
    cfg = {"dim": 4, "n_samples": 2000, "eps": [0.0, 0.5], "condition_numbers": [1, 10],
           "mean_norm": 1.5}
    a, b, c = g.run_study(cfg, 5), g.run_study(cfg, 5), g.run_study(cfg, 6)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert len(a["fits"]) == 4 and len(a["eigen"]) == 16
    assert not a["misalignment"].equals(c["misalignment"])
    assert np.allclose(a["misalignment"]["clean_acc_standard"], g.normal_cdf(1.5))


# --------------------------------------------------------------------------- Theorem 2 (robust ML)

def test_theorem2_solves_its_first_order_condition_and_spends_the_budget():
    rng = np.random.default_rng(3)
    mu = np.ones(6)
    Sigma = g.make_covariance(g.random_rotation(6, rng), 50.0, mu)
    values = np.linalg.eigvalsh(Sigma)
    for eps in (0.05, 0.2, 0.5):
        Sigma_r, lam = g.theorem2_covariance(Sigma, eps)
        r_values = np.linalg.eigvalsh(Sigma_r)
        np.testing.assert_allclose(r_values, np.sort(g.theorem2_eigenvalues(values, lam)), rtol=1e-10)
        m = 1 / (lam * g.theorem2_eigenvalues(values, lam) - 1)
        # stationarity of the likelihood in each eigen-direction: 1/s = (1/s_r)(1 + m)^2
        np.testing.assert_allclose(1 / values, (1 + m) ** 2 / g.theorem2_eigenvalues(values, lam), rtol=1e-9)
        assert (m > 0).all()
        np.testing.assert_allclose(np.sum(values * m ** 2), eps ** 2, rtol=1e-8)
        # same eigenvectors as Σ
        np.testing.assert_allclose(Sigma_r @ Sigma, Sigma @ Sigma_r, atol=1e-9)


def test_theorem2_flattens_the_covariance_as_eps_grows():
    rng = np.random.default_rng(4)
    mu = np.ones(8)
    Sigma = g.make_covariance(g.random_rotation(8, rng), 100.0, mu)
    conds, lams = [], []
    for eps in (1e-4, 0.1, 0.3, 1.0):
        Sigma_r, lam = g.theorem2_covariance(Sigma, eps)
        v = np.linalg.eigvalsh(Sigma_r)
        conds.append(v[-1] / v[0])
        lams.append(lam)
    assert conds[0] == pytest.approx(100.0, rel=0.02)  # tiny eps: Σ_r ≈ Σ
    assert all(a > b for a, b in zip(conds, conds[1:]))
    assert all(a > b for a, b in zip(lams, lams[1:]))  # the multiplier falls as eps grows
    same, lam = g.theorem2_covariance(Sigma, 0.0)
    np.testing.assert_array_equal(same, Sigma)
