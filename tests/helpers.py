"""Small shared builders for tests: tiny data artifacts and tiny trained models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from notbugs import data, hdf5, train

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = dict(epochs=3, batch_size=64, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                  schedule="triangle", milestones=[0.5, 0.75], gamma=0.1, label_smoothing=0.0,
                  drop_last=True, augment={}, adversarial=None)


def make_data_artifact(path: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    cfg = {"name": "tiny", "source": "synthetic", "n_train": n_train, "n_test": n_test, "synthetic": {}}
    return data.prepare(cfg, seed, path)


def train_tiny_model(data_path: Path, out_dir: Path, epochs: int = 3, seed: int = 0) -> Path:
    images, labels = hdf5.load_split(data_path, "train")
    with hdf5.open_artifact(data_path) as art:
        mean, std = art.attrs["mean"], art.attrs["std"]
    train.train(images, labels, arch="small_cnn", num_classes=10, mean=mean, std=std,
                cfg=dict(TINY_TRAIN, epochs=epochs), seed=seed, out_dir=out_dir, device=torch.device("cpu"))
    return out_dir / "model.pt"


def run_and_kill(code: str, trigger: str, timeout: float = 120) -> None:
    """Run ``code`` in a fresh Python and SIGKILL it as soon as a line containing ``trigger``
    appears on its output. Fails if the process finishes before that."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if trigger in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if time.time() > deadline:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"never saw {trigger!r} before the process ended:\n{''.join(seen[-20:])}")


def run_python(code: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def tables_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
