"""How much of an eps-0.5 targeted perturbation survives one more JPEG coding at quality 75.

    PYTHONPATH=src python docs/results/cifar10-cpu/session16-jpeg/jpeg_survival.py <run dir> [n images]

The CIFAR-10 copy this project has is JPEG (quality 75, 4:2:0 chroma), so whatever such coding
removes was missing from the images before any source was trained. This script asks how much of
the signal a D_det-style attack plants survives that coding. On the validation split it attacks
the run's `standard` source alone (the preset's D_det attacks three at once and keeps the rows
that reached t; this keeps every row) with D_det's settings (targeted L2 PGD towards t = (y+1) mod 10, eps 0.5,
30 steps of 0.1, keeping the best iterate), codes x and the attacked x' with
`notbugs.construct.jpeg_code` (PIL, quality 75, 4:2:0) and reports:

- the perturbation's L2 norm that is left, ||J(x') - J(x)|| / ||x' - x||, and the share that still
  points the original way, <J(x') - J(x), x' - x> / ||x' - x||^2, beside the same two numbers
  for Gaussian noise of the same norm per image (a reference without structure);
- how often the attacked source and an independently trained copy (`standard_2`, another seed,
  which this attack never used: transfer) read t on x' and on J(x').

It trains nothing: the run needs `sources/standard` and `sources/standard_2` and `data.h5`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from notbugs import attacks, hdf5
from notbugs.batches import predict
from notbugs.construct import jpeg_code
from notbugs.models import load_model

EPS, STEPS, STEP_SIZE, QUALITY, SUBSAMPLING = 0.5, 30, 0.1, 75, "4:2:0"


def kept(delta: np.ndarray, coded_delta: np.ndarray) -> dict:
    flat, coded = delta.reshape(len(delta), -1), coded_delta.reshape(len(delta), -1)
    norm2 = (flat ** 2).sum(1)
    return {"norm_left_median": round(float(np.median(np.sqrt((coded ** 2).sum(1) / norm2))), 3),
            "projection_left_median": round(float(np.median((coded * flat).sum(1) / norm2)), 3)}


def percent(mask) -> float:
    return round(100 * float(np.mean(mask)), 1)


def measure(run: Path, n_images: int) -> dict:
    results = next((run / "results").iterdir())
    images, labels = hdf5.load_split(results / "data.h5", "val")
    clean = images[:n_images].astype(np.float32) / 255
    labels = labels[:n_images]
    targets = (labels + 1) % 10
    attacked = load_model(results / "sources" / "standard" / "model.pt")[0]
    independent = load_model(results / "sources" / "standard_2" / "model.pt")[0]
    perturbed = np.concatenate([
        attacks.pgd(attacked, torch.from_numpy(clean[i:i + 250]), torch.from_numpy(targets[i:i + 250]), eps=EPS,
                    steps=STEPS, step_size=STEP_SIZE, targeted=True, keep_best=True).x_adv.numpy()
        for i in range(0, len(clean), 250)])
    delta = perturbed - clean
    coded_clean = jpeg_code(clean, QUALITY, SUBSAMPLING)
    coded_perturbed = jpeg_code(perturbed, QUALITY, SUBSAMPLING)
    norms = np.sqrt((delta.reshape(len(delta), -1) ** 2).sum(1))
    noise = np.random.default_rng(0).standard_normal(delta.shape).astype(np.float32)
    noise *= (norms / np.sqrt((noise.reshape(len(noise), -1) ** 2).sum(1)))[:, None, None, None]
    noise = np.clip(clean + noise, 0, 1) - clean  # the part of the noise the coding can see
    report = {"images": int(len(clean)), "split": "val", "attack": {"eps": EPS, "steps": STEPS, "step_size": STEP_SIZE},
              "jpeg": {"quality": QUALITY, "subsampling": SUBSAMPLING},
              "perturbation_l2_median": round(float(np.median(norms)), 3),
              "perturbation": kept(delta, coded_perturbed - coded_clean),
              "same_norm_gaussian_noise": kept(noise, jpeg_code(clean + noise, QUALITY, SUBSAMPLING) - coded_clean)}
    for name, model in (("attacked source", attacked), ("independent copy", independent)):
        with torch.no_grad():
            report[name] = {
                "clean accuracy, x": percent(predict(model, clean, 500) == labels),
                "clean accuracy, J(x)": percent(predict(model, coded_clean, 500) == labels),
                "reads t, x'": percent(predict(model, perturbed, 500) == targets),
                "reads t, J(x')": percent(predict(model, coded_perturbed, 500) == targets),
                "reads t, J(x)": percent(predict(model, coded_clean, 500) == targets)}
    return report


def main(run: str, n_images: str = "1000"):
    torch.manual_seed(0)
    print(json.dumps(measure(Path(run), int(n_images)), indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
