"""How much of each constructed set's change to x survives one more JPEG coding.

    PYTHONPATH=src python docs/results/cifar10-cpu/session21-jpeg-coded-sets/coding_survival.py \
        <run dir> <set>:<its coded set> [...]

For each row, x is the data file's training image (decoded from the JPEG copy), x' the set's
image, J(x') the coded set's image and delta = x' - x. Session 16's `kept` gives the medians of
||J(x') - J(x)|| / ||delta|| (norm left) and <J(x') - J(x), delta> / ||delta||^2 (projection
left), also for Gaussian noise of each row's norm. Rows the set left unchanged are skipped.
It also says how far the coding moves x itself: the copy's images were coded at quality 75, 4:2:0.
The coding's settings are the coded set's own (`quality`, `subsampling` in its config).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "session16-jpeg"))
from jpeg_survival import kept  # noqa: E402

from notbugs import hdf5  # noqa: E402
from notbugs.construct import jpeg_code  # noqa: E402


def survival(results: Path, name: str, coded_name: str, x_all: np.ndarray) -> dict:
    with hdf5.open_artifact(results / "constructed" / f"{name}.h5", kind="constructed") as art:
        rows, perturbed = art.split("train")["orig_index"][:], art.split("train").images[:]
    with hdf5.open_artifact(results / "constructed" / f"{coded_name}.h5", kind="constructed") as art:
        if not (art.split("train")["orig_index"][:] == rows).all():
            raise ValueError(f"{coded_name} does not hold {name}'s rows")
        coded = art.split("train").images[:]
        quality, subsampling = art.config[coded_name]["quality"], art.config[coded_name]["subsampling"]
    clean = x_all[rows]
    delta = perturbed - clean
    changed = (delta.reshape(len(delta), -1) ** 2).sum(1) > 0
    clean, delta, coded = clean[changed], delta[changed], coded[changed]
    coded_clean = jpeg_code(clean, quality, subsampling)
    norms = np.sqrt((delta.reshape(len(delta), -1) ** 2).sum(1))
    noise = np.random.default_rng(0).standard_normal(delta.shape).astype(np.float32)
    noise *= (norms / np.sqrt((noise.reshape(len(noise), -1) ** 2).sum(1)))[:, None, None, None]
    noise = np.clip(clean + noise, 0, 1) - clean
    recoding = np.sqrt(((coded_clean - clean).reshape(len(clean), -1) ** 2).sum(1))
    return {"quality": quality, "subsampling": subsampling, "rows": int(len(rows)), "rows_changed": int(changed.sum()),
            "perturbation_l2_median": round(float(np.median(norms)), 3),
            "recoding_moves_x_l2_median": round(float(np.median(recoding)), 4),
            "recoding_leaves_x_unchanged_share": round(float(np.mean(recoding == 0)), 3),
            "perturbation": kept(delta, coded - coded_clean),
            "same_norm_gaussian_noise": kept(noise, jpeg_code(clean + noise, quality, subsampling) - coded_clean)}


if __name__ == "__main__":
    results = next((Path(sys.argv[1]) / "results").iterdir())
    x_all, _ = hdf5.load_split(results / "data.h5", "train")
    x_all = x_all.astype(np.float32) / 255
    print(json.dumps({pair: survival(results, *pair.split(":"), x_all) for pair in sys.argv[2:]}, indent=1))
