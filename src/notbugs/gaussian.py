"""The Gaussian model of Ilyas et al. (2019, Sec. 4), studied numerically for linear classifiers.

Model
-----
``y`` is uniform on {±1} and ``x | y ~ N(y·μ, Σ)`` in ``d`` dimensions, with
``Σ = U diag(σ) Uᵀ`` and ``U`` a seeded random rotation, so the eigenbasis of Σ is misaligned
with the axes and (generically) with μ.  Classifiers are linear, ``sign(wᵀx)``; no bias is
needed because the two classes are symmetric about the origin.

Claims studied (the paper's three, in their linear-classifier form)
--------------------------------------------------------------------
1. *Vulnerability is caused by misalignment of the data metric with the L2 metric.*  The
   standard (Bayes / maximum-likelihood) classifier is ``Σ⁻¹μ``; its gap between clean and
   robust accuracy at fixed ε grows as Σ becomes more anisotropic, i.e. as ``Σ⁻¹μ`` turns away
   from ``μ`` (the L2-optimal direction).  ``misalignment = 1 − cos(Σ⁻¹μ, μ)``.  With the
   Mahalanobis norm fixed to ``‖μ‖`` (see :func:`make_covariance`) the standard classifier's
   robust accuracy is exactly ``Φ(‖μ‖ − ε/cos(Σ⁻¹μ, μ))``, so its vulnerability is a strictly
   increasing function of the misalignment alone; along the family ``Σ_c`` the misalignment is
   itself increasing in c (``log cos = K(s) − K(2s)/2`` with ``s = log c`` and K a cumulant
   generating function, and K' is increasing).
2. *Robust training moves the learned metric towards the identity*, shown for two estimators,
   each labelled in the tables: the paper's own, the robust *maximum-likelihood covariance* of
   its Theorem 2 (:func:`theorem2_covariance`, columns ``theorem2_*``), and robust logistic
   regression, whose optimum is ``w ∝ (Σ + κI)⁻¹μ`` with ``κ ≥ 0`` increasing with ε (the other
   columns), so the effective metric ``Σ + κI`` is better conditioned than Σ and ``w → μ``.
3. *Gradients of robust models are better aligned with the (here: perceptually / L2)
   meaningful direction.*  For a linear model the input gradient of the loss is ∝ w, so the
   alignment is ``cos(w, μ)``; it is larger for robust fits.

Theorem 2 (robust maximum likelihood; paper Sec. 4 and App. E)
---------------------------------------------------------------
The paper fits (μ, Σ) by maximum likelihood against an adversary that moves each sample by
``δ = M(x − μ)`` with M diagonal in Σ's eigenbasis and ``E‖δ‖² = ε²`` (a relaxation of the
per-sample ε-ball that the paper says is exact as d → ∞; the theorem holds for small ε, with Σ
and the learned covariance diagonal in one basis). The mean stays μ and, per eigenvalue s of Σ,
``s_r = s/2 + 1/λ + √(s/λ + s²/4)``, the root of the first-order condition
``1/s = (1/s_r)(1 + m)²`` with ``m = 1/(λ s_r − 1)``. λ is the adversary's multiplier, fixed
by the budget ``Σ_i s_i m_i² = ε²``; the left side falls from ∞ to 0 as λ grows, so the root is
unique (bisection in log λ). The paper writes the budget once as ε and once as ε²; ε² is what
its constraint set says. The classifier is the Bayes rule of the fitted Gaussian, ``Σ_r⁻¹μ``.

Derivation of the logistic estimator
-------------------------------------
* For a linear classifier the worst case under ``‖δ‖₂ ≤ ε`` is exact:
  ``min_δ y wᵀ(x+δ) = y wᵀx − ε‖w‖`` at ``δ = −ε y w/‖w‖``.  With ``z = y x ~ N(μ, Σ)`` the
  robust margin ``m = wᵀz − ε‖w‖ ~ N(wᵀμ − ε‖w‖, wᵀΣw)``, so the exact robust accuracy is
  ``Φ((wᵀμ − ε‖w‖)/√(wᵀΣw))`` and the clean accuracy is its ε = 0 case.
* The population robust logistic risk ``R_ε(w) = E[ℓ(m)]``, ``ℓ(m) = log(1 + e^{−m})``, is a
  1-D Gaussian expectation, computed with Gauss–Hermite quadrature (``hermgauss``,
  ``N_NODES`` nodes).  ``R_ε`` is convex in w (ℓ is convex and decreasing, m is concave in w).
  Gauss–Hermite accuracy degrades as the margin standard deviation grows (ℓ has poles at
  ``m = ±iπ``); with 300 nodes E ℓ, E ℓ', E ℓ'' are accurate to ≲1e-10 relative for margin
  sd ≤ 4, which covers every optimum for problems built by :func:`make_covariance` (there the
  Mahalanobis norm of μ is ‖μ‖ and the ε = 0 optimum ``2Σ⁻¹μ`` has margin sd ``2‖μ‖``).
* Stein's lemma, ``E[g(m) z] = μ E[g(m)] + Σw E[g'(m)]``, turns ``∇R_ε = 0`` into
  ``μ = (aΣ + bI) w`` with ``a = −E[ℓ''(m)]/E[ℓ'(m)] > 0`` and ``b = ε/‖w‖``, for any smooth
  convex margin loss.  Hence the robust optimum lies on the *ridge path*
  ``w(κ) ∝ (Σ + κI)⁻¹μ`` with ``κ = b/a ≥ 0``; ε = 0 gives κ = 0, i.e. ``Σ⁻¹μ`` (for the
  logistic loss exactly ``w = 2Σ⁻¹μ``, the Bayes posterior).
* For isotropic ``Σ = σ²I`` the optimum is ``w = s·μ`` and ``‖μ‖ = s(aσ² + ε/s)`` gives
  ``κ = εσ²/(‖μ‖ − ε)`` for any loss (a check used by the tests).
* :func:`closed_form_direction` **solves the stationarity conditions**: for each κ the scale s
  of ``w = s·(Σ+κI)⁻¹μ/‖·‖`` is optimised (1-D convex, safeguarded Newton), then κ is found as
  the root of ``g(κ) − κ`` where ``g(κ) = b/a`` evaluated at that ray optimum (Illinois /
  bisection).  At a root the ray condition and ``κ = b/a`` together give ``∇R_ε = 0``, so by
  convexity it is the global optimum; the root is well defined even for isotropic Σ, where the
  direction does not depend on κ.  It requires ``ε < ‖μ‖`` (otherwise the optimum is w = 0).

Tables returned by :func:`run_study` (all long format; one row per ``condition_number`` × ``eps``
unless stated).  Σ for condition number c has eigenvalues ∝ ``c^{−i/(d−1)}`` in a fixed random
eigenbasis, scaled so that ``μᵀΣ⁻¹μ = ‖μ‖²``: the Bayes clean accuracy ``Φ(‖μ‖)`` is the same for
every c, so only the geometry (misalignment) changes.  Sample fits use one seeded sample of size
``n_samples`` (common random numbers across c).

``fits``
    ``condition_number``, ``eps``;
    ``kappa_closed_form`` (κ of :func:`closed_form_direction`),
    ``kappa_population`` (:func:`implied_kappa` at the :func:`fit_population` optimum),
    ``kappa_sample`` (:func:`implied_kappa`, with the population μ, Σ, at the
    :func:`fit_samples` weights);
    ``cos_population_closed_form``, ``cos_sample_closed_form`` (cosine between the population /
    sample fit and the closed-form direction);
    ``stein_residual`` (``‖μ − (aΣ+bI)w‖/‖μ‖`` at the population fit; ≈ 0 checks Stein's form);
    ``cos_w_mu`` / ``cos_w_mu_sample`` (gradient alignment ``cos(w, μ)`` of the closed-form /
    sample fit); ``clean_acc``, ``robust_acc`` (exact, of the closed-form fit, attacked at the
    training ε) and ``clean_acc_sample``, ``robust_acc_sample`` (same for the sample fit);
    ``sigma_cond`` (cond(Σ) = c), ``metric_cond`` (cond(Σ+κI)),
    ``metric_cond_ratio`` (= metric_cond / sigma_cond ≤ 1);
    the paper's robust maximum likelihood (Theorem 2): ``theorem2_inv_lambda`` (1/λ, 0 at ε = 0),
    ``theorem2_cond`` (cond(Σ_r)), ``theorem2_cond_ratio`` (= theorem2_cond / sigma_cond),
    ``theorem2_cos_w_mu`` (cos(Σ_r⁻¹μ, μ)), ``theorem2_clean_acc`` and ``theorem2_robust_acc``
    (exact, of the Bayes rule Σ_r⁻¹μ of the fitted Gaussian, attacked at the training ε).
``misalignment``
    ``condition_number``, ``eps``; ``misalignment`` (``1 − cos(Σ⁻¹μ, μ)``, independent of ε);
    ``clean_acc_standard``, ``robust_acc_standard``, ``vulnerability_standard`` (clean − robust
    accuracy at ε of the standard classifier Σ⁻¹μ); ``kappa_robust``, ``clean_acc_robust``,
    ``robust_acc_robust``, ``vulnerability_robust`` (same for the closed-form robust optimum
    trained at that ε).
``eigen``
    one row per ``condition_number`` × ``eps`` × ``index`` (eigenvalue index, descending):
    ``kappa``; ``sigma_eig`` (eigenvalue of Σ), ``metric_eig`` (eigenvalue of Σ+κI) and
    ``theorem2_eig`` (eigenvalue of Σ_r), each rescaled to trace d (mean eigenvalue 1) so they
    can be compared directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from numpy.polynomial.hermite import hermgauss

N_NODES = 300

FITS_COLUMNS = ["condition_number", "eps", "kappa_closed_form", "kappa_population", "kappa_sample",
                "cos_population_closed_form", "cos_sample_closed_form", "stein_residual",
                "cos_w_mu", "cos_w_mu_sample", "clean_acc", "robust_acc", "clean_acc_sample",
                "robust_acc_sample", "sigma_cond", "metric_cond", "metric_cond_ratio",
                "theorem2_inv_lambda", "theorem2_cond", "theorem2_cond_ratio", "theorem2_cos_w_mu",
                "theorem2_clean_acc", "theorem2_robust_acc"]
MISALIGNMENT_COLUMNS = ["condition_number", "eps", "misalignment", "clean_acc_standard",
                        "robust_acc_standard", "vulnerability_standard", "kappa_robust",
                        "clean_acc_robust", "robust_acc_robust", "vulnerability_robust"]
EIGEN_COLUMNS = ["condition_number", "eps", "kappa", "index", "sigma_eig", "metric_eig", "theorem2_eig"]


# --------------------------------------------------------------------------- basics

@lru_cache(maxsize=8)
def normal_nodes(n_nodes: int = N_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ξ and weights p with ``Σ p f(ξ) ≈ E f(ξ)``, ``ξ ~ N(0, 1)`` (Gauss–Hermite)."""
    x, w = hermgauss(n_nodes)
    xi, p = x * math.sqrt(2.0), w / math.sqrt(math.pi)
    xi.setflags(write=False)
    p.setflags(write=False)
    return xi, p


def normal_cdf(x):
    """Standard normal cdf Φ via ``math.erfc`` (accurate in both tails); scalar or array."""
    if np.ndim(x) == 0:
        return 0.5 * math.erfc(-float(x) / math.sqrt(2.0))
    arr = np.asarray(x, dtype=float)
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in arr.ravel()]).reshape(arr.shape)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed rotation (orthogonal, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_covariance(rotation: np.ndarray, condition_number: float, mu: np.ndarray) -> np.ndarray:
    """``Σ = t·U diag(c^{−i/(d−1)}) Uᵀ`` with ``t`` chosen so that ``μᵀΣ⁻¹μ = ‖μ‖²``.

    Fixing the Mahalanobis norm keeps the Bayes accuracy ``Φ(‖μ‖)`` equal for every condition
    number c (c = 1 gives Σ = I), so the family varies only the misalignment."""
    d = rotation.shape[0]
    spectrum = float(condition_number) ** (-np.arange(d) / max(d - 1, 1))
    sigma = (rotation * spectrum) @ rotation.T
    scale = mu @ np.linalg.solve(sigma, mu) / (mu @ mu)
    sigma = scale * sigma
    return 0.5 * (sigma + sigma.T)


def sample_gaussian(mu: np.ndarray, Sigma: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` samples ``(x, y)`` of the model, y ∈ {±1} as floats."""
    y = rng.choice(np.array([-1.0, 1.0]), size=n)
    xi = rng.standard_normal((n, mu.size))
    return y[:, None] * mu + xi @ _sqrtm(Sigma), y


def _sqrtm(Sigma: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(Sigma)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


# --------------------------------------------------------------------------- exact quantities

def margin_moments(w, mu, Sigma, eps: float = 0.0) -> tuple[float, float]:
    """Mean and standard deviation of the robust margin ``m = wᵀz − ε‖w‖``, z ~ N(μ, Σ)."""
    w = np.asarray(w, float)
    return float(w @ mu - eps * np.linalg.norm(w)), float(math.sqrt(w @ Sigma @ w))


def accuracy(w, mu, Sigma, eps: float = 0.0) -> float:
    """Exact accuracy of sign(wᵀx) under the worst L2 perturbation of norm ≤ ε (ε=0: clean)."""
    mean, sd = margin_moments(w, mu, Sigma, eps)
    return normal_cdf(mean / sd)


def vulnerability(w, mu, Sigma, eps: float) -> float:
    """Clean minus robust accuracy at radius ε."""
    return accuracy(w, mu, Sigma, 0.0) - accuracy(w, mu, Sigma, eps)


def misalignment(mu, Sigma) -> float:
    """``1 − cos(Σ⁻¹μ, μ)``: angle between the data-metric and the L2-optimal directions."""
    return max(0.0, 1.0 - cosine(np.linalg.solve(Sigma, mu), mu))


def _softplus_neg(m):  # ℓ(m) = log(1 + e^{−m})
    return np.logaddexp(0.0, -m)


def _dloss(m):  # ℓ'(m) = −σ(−m)
    return -0.5 * (1.0 - np.tanh(0.5 * m))


def _d2loss(m):  # ℓ''(m) = σ(m)σ(−m)
    e = np.exp(-np.abs(m))
    return e / (1.0 + e) ** 2


def robust_risk(w, mu, Sigma, eps: float, n_nodes: int = N_NODES) -> float:
    """Population robust logistic risk ``R_ε(w) = E log(1 + exp(−m))`` by quadrature."""
    xi, p = normal_nodes(n_nodes)
    mean, sd = margin_moments(w, mu, Sigma, eps)
    return float(p @ _softplus_neg(mean + sd * xi))


def stein_coefficients(w, mu, Sigma, eps: float, n_nodes: int = N_NODES) -> tuple[float, float]:
    """``(a, b)`` of the stationarity condition ``μ = (aΣ + bI)w``:
    ``a = −E ℓ''(m)/E ℓ'(m)``, ``b = ε/‖w‖``, expectations by quadrature."""
    xi, p = normal_nodes(n_nodes)
    mean, sd = margin_moments(w, mu, Sigma, eps)
    m = mean + sd * xi
    a = -float(p @ _d2loss(m)) / float(p @ _dloss(m))
    return a, eps / float(np.linalg.norm(w))


def implied_kappa(w, mu, Sigma, eps: float, n_nodes: int = N_NODES) -> float:
    """κ = b/a of :func:`stein_coefficients` evaluated at w (0 for ε = 0)."""
    a, b = stein_coefficients(w, mu, Sigma, eps, n_nodes)
    return b / a


def stein_residual(w, mu, Sigma, eps: float, n_nodes: int = N_NODES) -> float:
    """``‖μ − (aΣ + bI)w‖ / ‖μ‖``; zero exactly at the optimum of the true risk."""
    a, b = stein_coefficients(w, mu, Sigma, eps, n_nodes)
    w = np.asarray(w, float)
    return float(np.linalg.norm(mu - a * Sigma @ w - b * w) / np.linalg.norm(mu))


# --------------------------------------------------------------------------- closed form

def ridge_direction(mu, Sigma, kappa: float) -> np.ndarray:
    """Unit vector along ``(Σ + κI)⁻¹μ``."""
    v = np.linalg.solve(Sigma + kappa * np.eye(len(mu)), mu)
    return v / np.linalg.norm(v)


def optimal_scale(v, mu, Sigma, eps: float, n_nodes: int = N_NODES) -> float:
    """``argmin_{s ≥ 0} R_ε(s·v)`` (convex in s) by safeguarded Newton; 0 if the robust margin
    mean along v is ≤ 0 (then no positive scale beats w = 0)."""
    xi, p = normal_nodes(n_nodes)
    alpha, beta = margin_moments(v, mu, Sigma, eps)
    if alpha <= 0:
        return 0.0
    u = alpha + beta * xi

    def d1(s):
        return float(p @ (_dloss(s * u) * u))

    lo, hi = 0.0, 1.0 / beta
    while d1(hi) < 0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:
            raise RuntimeError("optimal scale diverges")
    s = 0.5 * (lo + hi)
    for _ in range(200):
        g = d1(s)
        if g < 0:
            lo = s
        else:
            hi = s
        h = float(p @ (_d2loss(s * u) * u * u))
        step = g / h if h > 0 else np.inf
        s_new = s - step
        if not (lo < s_new < hi):
            s_new = 0.5 * (lo + hi)
        if abs(s_new - s) <= 1e-15 * s or hi - lo <= 1e-15 * hi:
            return s_new
        s = s_new
    return s


class ClosedForm(NamedTuple):
    """Robust optimum ``w = scale · (Σ+κI)⁻¹μ/‖(Σ+κI)⁻¹μ‖`` and its risk."""
    w: np.ndarray
    kappa: float
    scale: float
    risk: float


def _ray_kappa(kappa: float, mu, Sigma, eps: float, n_nodes: int) -> tuple[float, np.ndarray]:
    """g(κ): implied κ at the optimum along the ridge ray; +inf if that optimum is w = 0."""
    v = ridge_direction(mu, Sigma, kappa)
    s = optimal_scale(v, mu, Sigma, eps, n_nodes)
    if s == 0.0:
        return math.inf, 0.0 * v
    return implied_kappa(s * v, mu, Sigma, eps, n_nodes), s * v


def closed_form_direction(mu, Sigma, eps: float, n_nodes: int = N_NODES,
                          rtol: float = 1e-13) -> ClosedForm:
    """Population robust logistic optimum from the stationarity conditions (see module doc):
    the root κ of ``g(κ) − κ`` (g = implied κ at the scale-optimal point of the ridge ray),
    found by bracketing + Illinois regula falsi with bisection fallback.  ε = 0 gives κ = 0."""
    mu = np.asarray(mu, float)
    if eps < 0:
        raise ValueError("eps must be >= 0")
    if eps >= np.linalg.norm(mu):
        raise ValueError(f"eps={eps} >= ‖μ‖: the robust optimum is w = 0")

    def finish(kappa):
        v = ridge_direction(mu, Sigma, kappa)
        s = optimal_scale(v, mu, Sigma, eps, n_nodes)
        return ClosedForm(s * v, float(kappa), s, robust_risk(s * v, mu, Sigma, eps, n_nodes))

    if eps == 0:
        return finish(0.0)

    def h(k):
        return _ray_kappa(k, mu, Sigma, eps, n_nodes)[0] - k

    lo, h_lo = 0.0, h(0.0)  # > 0 (b > 0), possibly +inf
    hi = max(float(np.trace(Sigma)) / len(mu), h_lo if np.isfinite(h_lo) else 0.0)
    h_hi = h(hi)
    while h_hi > 0:
        lo, h_lo = hi, h_hi
        hi *= 4.0
        h_hi = h(hi)
        if hi > 1e15:
            raise RuntimeError("no root for kappa")
    side = 0
    for _ in range(300):
        if hi - lo <= rtol * hi:
            break
        if np.isfinite(h_lo):
            k = (lo * h_hi - hi * h_lo) / (h_hi - h_lo)  # regula falsi
            if not (lo < k < hi):
                k = 0.5 * (lo + hi)
        else:
            k = 0.5 * (lo + hi)
        hk = h(k)
        if hk == 0:
            lo = hi = k
            break
        if hk > 0:
            lo, h_lo = k, hk
            if side == 1:
                h_hi *= 0.5  # Illinois: halve the stale end
            side = 1
        else:
            hi, h_hi = k, hk
            if side == -1 and np.isfinite(h_lo):
                h_lo *= 0.5
            side = -1
        if abs(hk) <= rtol * k:
            lo = hi = k
            break
    return finish(0.5 * (lo + hi))


# --------------------------------------------------------------------------- fits (torch)

def _lbfgs(loss_and_grad, w0: np.ndarray, tol_grad: float, max_rounds: int = 20) -> np.ndarray:
    """torch LBFGS (float64, strong-Wolfe) on an objective with an analytic gradient.

    ``loss_and_grad(w) -> (loss, grad)`` works on detached tensors (cheap on a busy machine,
    where autograd's per-call overhead dominates these tiny problems).  Rounds of ``step`` are
    repeated until the max-abs gradient is ≤ ``tol_grad`` or a round no longer moves w (the
    float64 floor of the objective has been reached)."""
    w = torch.tensor(np.asarray(w0, float), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, max_eval=1000, history_size=50,
                            tolerance_grad=tol_grad, tolerance_change=1e-30,
                            line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            loss, grad = loss_and_grad(w.detach())
        w.grad = grad
        return loss

    for _ in range(max_rounds):
        before = w.detach().clone()
        opt.step(closure)
        if float(w.grad.abs().max()) <= tol_grad or torch.equal(before, w.detach()):
            break
    return w.detach().numpy().copy()


def population_loss_and_grad(w: torch.Tensor, mu: torch.Tensor, Sigma: torch.Tensor, eps: float,
                             xi: torch.Tensor, p: torch.Tensor):
    """Quadrature ``R_ε(w)`` and its gradient ``A(μ − εw/‖w‖) + B·Σw/sd`` with
    ``A = E ℓ'(m)``, ``B = E ℓ'(m)ξ`` (torch, float64)."""
    norm = torch.linalg.vector_norm(w)
    sw = Sigma @ w
    sd = torch.sqrt(w @ sw)
    m = w @ mu - eps * norm + sd * xi
    loss = p @ torch.logaddexp(torch.zeros_like(m), -m)
    dl = -p * torch.sigmoid(-m)
    return loss, dl.sum() * (mu - eps * w / norm) + (dl @ xi) * sw / sd


def sample_loss_and_grad(w: torch.Tensor, z: torch.Tensor, eps: float):
    """``mean log(1 + exp(−(zᵀw − ε‖w‖)))`` over the rows z = y·x, and its gradient."""
    norm = torch.linalg.vector_norm(w)
    m = z @ w - eps * norm
    loss = torch.logaddexp(torch.zeros_like(m), -m).mean()
    dl = -torch.sigmoid(-m) / m.numel()
    return loss, z.T @ dl - eps * dl.sum() * w / norm


def fit_population(mu, Sigma, eps: float, n_nodes: int = N_NODES) -> np.ndarray:
    """Minimise the quadrature robust risk R_ε over w ∈ R^d with torch LBFGS (float64,
    strong-Wolfe, gradient tolerance 1e-11 or the float64 floor), starting from Σ⁻¹μ."""
    xi, p = (torch.tensor(a, dtype=torch.float64) for a in normal_nodes(n_nodes))
    mu_t = torch.tensor(mu, dtype=torch.float64)
    sig_t = torch.tensor(Sigma, dtype=torch.float64)
    return _lbfgs(lambda w: population_loss_and_grad(w, mu_t, sig_t, eps, xi, p),
                  np.linalg.solve(Sigma, mu), tol_grad=1e-11)


def fit_samples(x, y, eps: float, w0=None, tol_grad: float = 1e-9) -> np.ndarray:
    """Finite-sample robust logistic regression: minimise
    ``mean log(1 + exp(−(y xᵀw − ε‖w‖)))`` (the exact inner max for a linear model) with
    torch LBFGS; starts from the sample ``Σ̂⁻¹μ̂`` of z = y·x unless ``w0`` is given."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    z = y[:, None] * x
    if w0 is None:
        w0 = np.linalg.solve(np.cov(z, rowvar=False), z.mean(0))
    z_t = torch.tensor(z, dtype=torch.float64)
    return _lbfgs(lambda w: sample_loss_and_grad(w, z_t, eps), w0, tol_grad=tol_grad)



# --------------------------------------------------------------------------- Theorem 2

def theorem2_eigenvalues(sigma_eigs: np.ndarray, lam: float) -> np.ndarray:
    """The paper's Theorem 2 per eigenvalue: s/2 + 1/λ + √(s/λ + s²/4)."""
    s = np.asarray(sigma_eigs, float)
    return s / 2 + 1 / lam + np.sqrt(s / lam + s ** 2 / 4)


def theorem2_budget(sigma_eigs: np.ndarray, lam: float) -> float:
    """E‖M(x − μ)‖² = Σ_i s_i m_i² with m_i = 1/(λ s_r,i − 1): the adversary's spend at λ."""
    m = 1 / (lam * theorem2_eigenvalues(sigma_eigs, lam) - 1)
    return float(np.sum(np.asarray(sigma_eigs, float) * m ** 2))


def theorem2_covariance(Sigma: np.ndarray, eps: float) -> tuple[np.ndarray, float]:
    """(Σ_r, λ): the robust maximum-likelihood covariance of Theorem 2 at radius ε, in the
    original basis (Σ_r shares Σ's eigenvectors). ε = 0 returns (Σ, inf)."""
    values, vectors = np.linalg.eigh(Sigma)
    if eps == 0:
        return Sigma.copy(), math.inf
    lo, hi = -60.0, 60.0  # log λ; the budget is decreasing in λ
    if not theorem2_budget(values, math.exp(lo)) > eps ** 2 > theorem2_budget(values, math.exp(hi)):
        raise ValueError(f"Theorem 2: no multiplier spends eps^2 = {eps ** 2:g} in [e^{lo:g}, e^{hi:g}]")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if theorem2_budget(values, math.exp(mid)) > eps ** 2 else (lo, mid)
    lam = math.exp((lo + hi) / 2)
    return (vectors * theorem2_eigenvalues(values, lam)) @ vectors.T, lam

# --------------------------------------------------------------------------- study

def run_study(cfg: Mapping, seed: int) -> dict[str, pd.DataFrame]:
    """All tables of the module docstring for the configuration ``cfg`` (the validated config
    section ``studies.gaussian``).  The sample fit at each ε is warm-started from the one at
    the previous ε (the first from the sample Σ̂⁻¹μ̂)."""
    d, n = int(cfg["dim"]), int(cfg["n_samples"])
    eps_list = [float(e) for e in cfg["eps"]]
    conds = [float(c) for c in cfg["condition_numbers"]]
    rng = np.random.default_rng(seed)
    rot = random_rotation(d, rng)
    direction = rng.standard_normal(d)
    mu = float(cfg["mean_norm"]) * direction / np.linalg.norm(direction)
    y = rng.choice(np.array([-1.0, 1.0]), size=n)
    xi = rng.standard_normal((n, d))

    fits, mis, eig = [], [], []
    for c in conds:
        Sigma = make_covariance(rot, c, mu)
        x = y[:, None] * mu + xi @ _sqrtm(Sigma)
        sig_vals = np.sort(np.linalg.eigvalsh(Sigma))[::-1]
        w_std = np.linalg.solve(Sigma, mu)
        mis_c = misalignment(mu, Sigma)
        w_sample_prev = None
        for eps in eps_list:
            cf = closed_form_direction(mu, Sigma, eps)
            w_pop = fit_population(mu, Sigma, eps)
            w_smp = fit_samples(x, y, eps, w0=w_sample_prev)
            w_sample_prev = w_smp
            metric_vals = sig_vals + cf.kappa
            Sigma_r, lam = theorem2_covariance(Sigma, eps)
            r_vals = np.sort(np.linalg.eigvalsh(Sigma_r))[::-1]
            w_r = np.linalg.solve(Sigma_r, mu)
            fits.append({
                "condition_number": c, "eps": eps, "kappa_closed_form": cf.kappa,
                "kappa_population": implied_kappa(w_pop, mu, Sigma, eps),
                "kappa_sample": implied_kappa(w_smp, mu, Sigma, eps),
                "cos_population_closed_form": cosine(w_pop, cf.w),
                "cos_sample_closed_form": cosine(w_smp, cf.w),
                "stein_residual": stein_residual(w_pop, mu, Sigma, eps),
                "cos_w_mu": cosine(cf.w, mu), "cos_w_mu_sample": cosine(w_smp, mu),
                "clean_acc": accuracy(cf.w, mu, Sigma),
                "robust_acc": accuracy(cf.w, mu, Sigma, eps),
                "clean_acc_sample": accuracy(w_smp, mu, Sigma),
                "robust_acc_sample": accuracy(w_smp, mu, Sigma, eps),
                "sigma_cond": sig_vals[0] / sig_vals[-1],
                "metric_cond": metric_vals[0] / metric_vals[-1],
                "metric_cond_ratio": (metric_vals[0] / metric_vals[-1])
                / (sig_vals[0] / sig_vals[-1]),
                "theorem2_inv_lambda": 1 / lam,  # 0 at eps = 0: no adversary
                "theorem2_cond": r_vals[0] / r_vals[-1],
                "theorem2_cond_ratio": (r_vals[0] / r_vals[-1]) / (sig_vals[0] / sig_vals[-1]),
                "theorem2_cos_w_mu": cosine(w_r, mu), "theorem2_clean_acc": accuracy(w_r, mu, Sigma),
                "theorem2_robust_acc": accuracy(w_r, mu, Sigma, eps),
            })
            mis.append({
                "condition_number": c, "eps": eps, "misalignment": mis_c,
                "clean_acc_standard": accuracy(w_std, mu, Sigma),
                "robust_acc_standard": accuracy(w_std, mu, Sigma, eps),
                "vulnerability_standard": vulnerability(w_std, mu, Sigma, eps),
                "kappa_robust": cf.kappa, "clean_acc_robust": accuracy(cf.w, mu, Sigma),
                "robust_acc_robust": accuracy(cf.w, mu, Sigma, eps),
                "vulnerability_robust": vulnerability(cf.w, mu, Sigma, eps),
            })
            for i, (s_ev, m_ev, r_ev) in enumerate(zip(sig_vals, metric_vals, r_vals)):
                eig.append({"condition_number": c, "eps": eps, "kappa": cf.kappa, "index": i,
                            "sigma_eig": s_ev * d / sig_vals.sum(),
                            "metric_eig": m_ev * d / metric_vals.sum(),
                            "theorem2_eig": r_ev * d / r_vals.sum()})
    return {"fits": pd.DataFrame(fits, columns=FITS_COLUMNS),
            "misalignment": pd.DataFrame(mis, columns=MISALIGNMENT_COLUMNS),
            "eigen": pd.DataFrame(eig, columns=EIGEN_COLUMNS)}
