"""Batched attacks in pixel space: PGD (L2, L∞, targeted or not) and representation inversion.

An attack is a *threat model* (``init / step / project``) driven by a loss; threat models
compose with any loss, which is how PGD and inversion share one loop (:func:`descend`).

Attacks never compute parameter gradients and leave the model's train/eval mode and
``requires_grad`` flags exactly as they found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

_TINY = 1e-12


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against the batch."""
    return t.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class L2Ball:
    """‖δ‖₂ ≤ eps; steps move ``step_size`` along the L2-normalised gradient."""

    eps: float
    step_size: float

    def init(self, x: torch.Tensor, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
        if not random_start:
            return torch.zeros_like(x)
        direction = torch.randn(x.shape, generator=generator, device="cpu").to(x)
        radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device="cpu").to(x)
        return direction / _flat_norm(direction) * radius * self.eps

    def step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return delta - self.step_size * grad / _flat_norm(grad)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        delta = delta * torch.clamp(self.eps / _flat_norm(delta), max=1.0)
        return (x + delta).clamp(0, 1) - x


@dataclass(frozen=True)
class LinfBall:
    """‖δ‖∞ ≤ eps; signed-gradient steps."""

    eps: float
    step_size: float

    def init(self, x: torch.Tensor, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
        if not random_start:
            return torch.zeros_like(x)
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x)
        return (2 * u - 1) * self.eps

    def step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return delta - self.step_size * grad.sign()

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        delta = delta.clamp(-self.eps, self.eps)
        return (x + delta).clamp(0, 1) - x


@dataclass(frozen=True)
class UnboundedL2:
    """No ball, only the [0,1] box: the threat model of representation inversion."""

    step_size: float

    def init(self, x: torch.Tensor, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
        return torch.zeros_like(x)

    def step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return delta - self.step_size * grad / _flat_norm(grad)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (x + delta).clamp(0, 1) - x


THREAT_MODELS = {"l2": L2Ball, "linf": LinfBall}


def threat_model(norm: str, eps: float, step_size: float) -> L2Ball | LinfBall:
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(THREAT_MODELS)}")
    return THREAT_MODELS[norm](eps, step_size)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; restores both flags after
    (per submodule, so e.g. BatchNorm layers frozen in eval inside a training model stay so)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, was_training in modes:
            m.training = was_training


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: convolutions run markedly faster on it (CPU and GPU), results are unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# A loss maps the perturbed batch to one loss value per example, to be *minimised*.
PerExampleLoss = Callable[[torch.Tensor], torch.Tensor]


def descend(x: torch.Tensor, loss_fn: PerExampleLoss, threat, steps: int, *, random_start: bool = False,
            keep_best: bool = False, generator: torch.Generator | None = None, step_decay: str = "none",
            with_output: bool = False, evaluate_last: bool = True) -> tuple:
    """Projected descent of ``loss_fn`` from ``x`` under ``threat``. Returns (x_adv, loss per example).

    With ``keep_best`` the lowest-loss iterate of each example is returned, otherwise the last.
    ``step_decay="linear"`` shrinks the step size linearly to zero over the run.
    With ``with_output`` the loss function returns (loss, output), output having a row per example
    (a model's logits, say), and descend returns (x_adv, loss, output) with the rows of the
    returned iterates: a caller needs no second forward pass on x_adv.
    ``evaluate_last=False`` skips the forward pass at the last iterate, whose loss (and output)
    come back as None: for callers that want only the iterate, such as adversarial training.
    """
    if keep_best and not evaluate_last:
        raise ValueError("keep_best compares the last iterate with the others, so it needs evaluate_last")

    def evaluate(z):
        return loss_fn(z) if with_output else (loss_fn(z), None)

    delta = threat.project(x, threat.init(x, random_start, generator))
    best = None
    base_threat = threat
    for i in range(steps):
        if step_decay == "linear":
            threat = dataclasses.replace(base_threat, step_size=base_threat.step_size * (1 - i / steps))
        delta.requires_grad_(True)
        loss, output = evaluate(x + delta)
        grad, = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            if keep_best:
                best = _keep_lower(best, loss.detach(), delta.detach(), None if output is None else output.detach())
            delta = threat.project(x, threat.step(delta.detach(), grad))
    loss = output = None
    if evaluate_last:
        with torch.no_grad():
            loss, output = evaluate(x + delta)
            if keep_best:
                loss, delta, output = _keep_lower(best, loss, delta, output)
    x_adv = (x + delta).detach()
    return (x_adv, loss, output) if with_output else (x_adv, loss)


def _keep_lower(best, loss, iterate, output):
    """(loss, iterate, output) of each example's lower-loss candidate: ``best`` so far or this one
    (descent iterates, or the results of attack restarts)."""
    if best is None:
        return loss.clone(), iterate.clone(), None if output is None else output.clone()
    best_loss, best_iterate, best_output = best
    better = loss < best_loss
    best_iterate[better] = iterate[better]
    if best_output is not None:
        best_output[better] = output[better]
    return torch.where(better, loss, best_loss), best_iterate, best_output


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    loss: torch.Tensor           # cross-entropy towards the target (targeted) or the label
    perturbation_norm: torch.Tensor  # L2 norm of x_adv - x
    success: torch.Tensor        # targeted: prediction == target; untargeted: prediction != label
    prediction: torch.Tensor     # the model's class for x_adv


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, step_size: float,
        norm: str = "l2", targeted: bool = False, random_start: bool = False, restarts: int = 1,
        keep_best: bool = False, worst_iterate: bool = False, generator: torch.Generator | None = None
        ) -> AttackResult:
    """Projected gradient descent. Targeted: ``y`` is the target class and the attack minimises
    its cross-entropy; untargeted: ``y`` is the true label and the attack maximises it.

    ``keep_best`` returns each example's lowest-loss iterate (as the authors' constructions do).
    ``worst_iterate`` is for measuring robustness: an example counts as broken if *any* iterate
    (the start included) succeeds, and that iterate is returned; broken examples leave the batch,
    so the attack costs little on models that are not robust. With ``restarts`` > 1 (which needs a
    random start to differ) each example keeps its most successful run."""
    if worst_iterate:
        return _pgd_worst_iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, norm=norm,
                                  targeted=targeted, random_start=random_start, restarts=restarts, generator=generator)
    threat = threat_model(norm, eps, step_size)
    sign = 1.0 if targeted else -1.0
    with frozen(model):
        def loss_fn(z):
            logits = model(z)
            return sign * F.cross_entropy(logits, y, reduction="none"), logits

        best = None
        for _ in range(max(1, restarts)):
            x_adv, loss, logits = descend(x, loss_fn, threat, steps, random_start=random_start,
                                          keep_best=keep_best, generator=generator, with_output=True)
            best = _keep_lower(best, loss, x_adv, logits)
    best_loss, best_x, best_logits = best
    pred = best_logits.argmax(1)
    success = pred == y if targeted else pred != y
    return AttackResult(best_x, sign * best_loss, (best_x - x).flatten(1).norm(dim=1), success, pred)


def _pgd_worst_iterate(model, x, y, *, eps, steps, step_size, norm, targeted, random_start, restarts, generator
                       ) -> AttackResult:
    threat = threat_model(norm, eps, step_size)
    sign = 1.0 if targeted else -1.0
    x_adv, loss_out = x.clone(), torch.zeros(len(x), device=x.device)
    pred_out = torch.zeros(len(x), dtype=torch.long, device=x.device)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with frozen(model):
        for _ in range(max(1, restarts)):
            active = (~broken).nonzero().squeeze(1)
            if not len(active):
                break
            xa, ya = x[active], y[active]
            delta = threat.project(xa, threat.init(xa, random_start, generator))
            for i in range(steps + 1):
                delta.requires_grad_(i < steps)
                with torch.set_grad_enabled(i < steps):
                    logits = model(xa + delta)
                    loss = F.cross_entropy(logits, ya, reduction="none")
                with torch.no_grad():
                    pred = logits.argmax(1)
                    hit = pred == ya if targeted else pred != ya
                    # Record every example's current iterate; a broken one keeps it for good.
                    settle = hit | (i == steps)
                    rows = active[settle]
                    x_adv[rows] = (xa + delta).detach()[settle]
                    loss_out[rows], pred_out[rows] = loss.detach()[settle], pred[settle]
                    broken[active[hit]] = True
                if i == steps or hit.all():
                    break
                grad, = torch.autograd.grad(sign * loss.sum(), delta)
                with torch.no_grad():
                    keep = ~hit
                    active, xa, ya = active[keep], xa[keep], ya[keep]
                    delta = threat.project(xa, threat.step(delta.detach()[keep], grad[keep]))
    return AttackResult(x_adv, loss_out, (x_adv - x).flatten(1).norm(dim=1), broken, pred_out)


def nontransferable_pgd(model: nn.Module, others: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                        target: torch.Tensor, *, eps: float, steps: int, step_size: float, weight: float,
                        keep_best: bool = True) -> AttackResult:
    """Nakkiran's non-transferable targeted L2 PGD: move ``model`` towards ``target`` while
    *descending* the mean loss of the independently trained ``others`` on the true label ``y``,
    i.e. minimise CE(f(z), t) + weight · mean_k CE(f_k(z), y). The result fools ``model`` but
    carries little that other models would read as ``target``."""
    threat = L2Ball(eps, step_size)
    with contextlib.ExitStack() as stack:
        for m in [model, *others]:
            stack.enter_context(frozen(m))

        def loss_fn(z):
            logits = model(z)
            loss = F.cross_entropy(logits, target, reduction="none")
            if others:
                keep = torch.stack([F.cross_entropy(m(z), y, reduction="none") for m in others])
                loss = loss + weight * keep.mean(0)
            return loss, logits

        x_adv, _, logits = descend(x, loss_fn, threat, steps, keep_best=keep_best, with_output=True)
    pred = logits.argmax(1)
    return AttackResult(x_adv, F.cross_entropy(logits, target, reduction="none"),
                        (x_adv - x).flatten(1).norm(dim=1), pred == target, pred)


@dataclass
class InversionResult:
    x_inv: torch.Tensor
    loss: torch.Tensor            # ‖g(z) − g(x)‖ / ‖g(x)‖ at the end
    perturbation_norm: torch.Tensor  # ‖z − start‖₂
    reached: torch.Tensor         # loss ≤ tolerance


def invert(model: nn.Module, start: torch.Tensor, target: torch.Tensor, *, steps: int, step_size: float,
           tolerance: float, step_decay: str, keep_best: bool = True) -> InversionResult:
    """Find z in [0,1]^d, starting at ``start``, whose representation matches ``target``'s:
    minimise ‖g(z) − g(target)‖₂ / ‖g(target)‖₂ with L2-normalised steps (no ε-ball)."""
    with frozen(model):
        with torch.no_grad():
            goal = model.features(target)
            goal_norm = goal.norm(dim=1).clamp_min(_TINY)

        def loss_fn(z):
            return (model.features(z) - goal).norm(dim=1) / goal_norm

        z, loss = descend(start, loss_fn, UnboundedL2(step_size), steps, keep_best=keep_best,
                          step_decay=step_decay)
    return InversionResult(z, loss, (z - start).flatten(1).norm(dim=1), loss <= tolerance)
