"""Stages 2 and 4, training: source models (standard or adversarial) and target models.

One recipe for both, readable top to bottom in :func:`train`:
SGD with momentum, a per-epoch schedule, optional crop/flip augmentation on the device,
optional label smoothing, optional PGD adversarial training (L2 or L∞), and forward passes in
float32 or autocast bfloat16 (``precision``).

Determinism and resume: the model is initialised from ``seed``, and every epoch draws its
shuffle, augmentation and attack starts from a generator seeded by (seed, epoch). The state is
checkpointed after each epoch, so a killed run that is restarted continues from the last
finished epoch and ends with the same weights as an uninterrupted run (on CPU). The result is
always the *last* epoch; nothing is selected on the test set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from notbugs import attacks
from notbugs.batches import classes, to_float
from notbugs.models import build_model, save_checkpoint
from notbugs.runtime import atomic_write
from notbugs.sampling import epoch_generator

log = logging.getLogger(__name__)
LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_robust_acc", "seconds"]


def lr_at(epoch: int, cfg: Mapping) -> float:
    """Learning rate for ``epoch`` (0-based) under the configured schedule."""
    base, total = cfg["lr"], cfg["epochs"]
    schedule = cfg["schedule"]
    if schedule == "constant":
        return base
    if schedule == "step":
        drops = sum(epoch >= round(m * total) for m in cfg["milestones"])
        return base * cfg["gamma"] ** drops
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / total))
    if schedule == "triangle":  # linear warm-up to the peak at 1/5, then linear decay to 0
        peak = max(1, round(total / 5))
        return base * (epoch + 1) / peak if epoch < peak else base * (total - epoch) / max(1, total - peak)
    raise ValueError(f"unknown schedule {schedule!r}")


def augment(x: torch.Tensor, cfg: Mapping, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per example, on x's device."""
    n, _, h, w = x.shape
    if cfg["crop"]:
        pad = cfg["padding"]
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if cfg["flip"]:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x


def fingerprint(cfg: Mapping, seed: int, n_train: int) -> str:
    return json.dumps({"cfg": cfg, "seed": seed, "n": n_train}, sort_keys=True, default=str)


def initial_model(arch: str, num_classes: int, mean, std, seed: int, device: torch.device | str = "cpu"):
    """The untrained model that training with ``seed`` starts from."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, mean, std).to(device).to(memory_format=torch.channels_last)


def epoch_order(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Generator]:
    """The shuffled row order of one epoch, and the generator its augmentation and attacks go on with."""
    gen = epoch_generator(seed, epoch)
    return torch.randperm(n, generator=gen), gen


def predictions(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's classes for un-augmented images in eval mode, the model left as it was."""
    with attacks.frozen(model):
        return classes(model, images, batch_size, images.device)


def validate(model, val_images: torch.Tensor, val_labels: torch.Tensor, val_cfg: Mapping, batch_size: int
             ) -> tuple[float, float]:
    """(accuracy, robust accuracy or NaN) on the validation split, the model left as it was.
    Robust accuracy attacks the first ``robust_examples`` images with L2 PGD (worst iterate)."""
    preds = predictions(model, val_images, batch_size)
    accuracy = float((preds == val_labels).float().mean())
    k = min(val_cfg["robust_examples"], len(val_labels))
    if not k:
        return accuracy, float("nan")
    eps, steps = val_cfg["robust_eps"], val_cfg["robust_steps"]
    res = attacks.pgd(model, to_float(val_images[:k]), val_labels[:k], eps=eps, steps=steps,
                      step_size=2.5 * eps / steps, norm="l2", worst_iterate=True)
    return accuracy, float(((preds[:k] == val_labels[:k]) & ~res.success).float().mean())


def train(images: np.ndarray, labels: np.ndarray, *, arch: str, num_classes: int, mean, std,
          cfg: Mapping, seed: int, out_dir: str | os.PathLike, device: torch.device,
          checkpoint_config: Mapping | None = None, val: tuple[np.ndarray, np.ndarray] | None = None,
          val_cfg: Mapping | None = None, keep_resume_state: bool = False) -> dict:
    """Train, checkpointing each epoch into ``out_dir/checkpoints``; writes ``out_dir/model.pt``
    and ``out_dir/train_log.csv``. With ``val`` (images, labels) and the config section
    ``validation`` as ``val_cfg``, every epoch also logs accuracy on the validation split (which
    draws no random numbers, so it does not change the training run). The resume state is removed
    once the model is written, unless ``keep_resume_state``. Returns a summary dict."""
    out_dir = Path(out_dir)
    resume_path = out_dir / "checkpoints" / "last.pt"
    fp = fingerprint({**cfg, "arch": arch}, seed, len(labels))

    model = initial_model(arch, num_classes, mean, std, seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    start_epoch, history, elapsed = 0, [], 0.0
    if resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
            log.info("resuming from %s after epoch %d", resume_path, start_epoch)
        else:
            log.info("ignoring %s: it was made with other settings", resume_path)

    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    if val is not None:
        x_val, y_val = torch.from_numpy(val[0]).to(device), torch.from_numpy(val[1]).to(device)
    adv = cfg["adversarial"]
    bf16 = cfg["precision"] == "bfloat16"
    threat = attacks.threat_model(adv["norm"], adv["eps"], adv["step_size"]) if adv else None
    n, bs = len(labels), cfg["batch_size"]
    steps_per_epoch = max(1, n // bs) if cfg["drop_last"] and n >= bs else math.ceil(n / bs)

    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.perf_counter()
        order, gen = epoch_order(seed, epoch, n)
        order = order.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        model.train()
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch",
                   leave=False, mininterval=1 if os.isatty(2) else 30)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            x = augment(to_float(x_all[idx]), cfg["augment"], gen)
            y = y_all[idx]
            if threat is not None:
                x = _adversarial_batch(model, x, y, threat, adv, gen, bf16)
            logits, loss = train_step(model, opt, x, y, cfg["label_smoothing"], bf16)
            total_loss += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        elapsed += time.perf_counter() - t0
        val_acc, val_robust = (validate(model, x_val, y_val, val_cfg, bs) if val is not None
                               else (float("nan"), float("nan")))
        row = dict(epoch=epoch + 1, lr=lr_at(epoch, cfg), train_loss=float(total_loss) / seen,
                   train_acc=float(correct) / seen, val_acc=val_acc, val_robust_acc=val_robust,
                   seconds=round(elapsed, 3))
        history.append(row)
        log.info("epoch %d/%d  loss %.4f  acc %.4f  val acc %.4f  val robust %.4f  lr %.4g", row["epoch"],
                 cfg["epochs"], row["train_loss"], row["train_acc"], val_acc, val_robust, row["lr"])
        with atomic_write(resume_path) as tmp:
            torch.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "history": history, "elapsed": elapsed}, tmp)

    # How well the model fits its own training set (un-augmented): a control such as a
    # leakage-only set means nothing if its shortcut was never learnt (docs/paper-notes.md §6).
    train_fit = float((predictions(model, x_all, bs) == y_all).float().mean())
    log.info("fit of its own training set: %.4f", train_fit)
    write_log(out_dir / "train_log.csv", history)
    save_checkpoint(out_dir / "model.pt", model, arch=arch, num_classes=num_classes, mean=mean, std=std,
                    config=dict(checkpoint_config or {}, train=dict(cfg)), epochs=cfg["epochs"],
                    seed=seed, train_seconds=elapsed, train_fit=train_fit)
    if not keep_resume_state:
        shutil.rmtree(resume_path.parent, ignore_errors=True)
    return {"train_seconds": elapsed, "final_train_acc": history[-1]["train_acc"] if history else None,
            "train_fit": train_fit}


def forward(model, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Float32 logits of ``model(x)``, its forward pass autocast to bfloat16 if ``bf16``."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def train_step(model, opt, x, y, label_smoothing: float = 0.0, bf16: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns the (detached) logits and mean loss."""
    logits = forward(model, x, bf16)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits.detach(), loss.detach()


def _adversarial_batch(model, x, y, threat, adv: Mapping, gen: torch.Generator, bf16: bool = False
                       ) -> torch.Tensor:
    def loss_fn(z):
        return -F.cross_entropy(forward(model, z, bf16), y, reduction="none")
    with attacks.frozen(model):
        x_adv, _ = attacks.descend(x, loss_fn, threat, adv["steps"], random_start=adv["random_start"],
                                   generator=gen)
    return x_adv


def write_log(path: Path, history: list[dict]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
