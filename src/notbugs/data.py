"""Stage 1, prepare data: build ``results/<dataset>/data.h5`` from one of three sources.

``synthetic`` (the built-in default, no download; defaults tuned so that the default pipeline shows
every effect of the paper on a small CNN in a few CPU minutes)
    10 classes of 3×32×32 images with *planted* features, generated from a seed:

    x = clip(0.5 + b + a·r[k] + n[y] + σ·ξ, 0, 1)

    - ``b``: a smooth random background per image (Gaussian on an 8×8 grid, bilinearly
      upsampled, per-pixel std ``background_std``): class-independent nuisance.
    - ``r[k]``: the **robust feature**. One fixed smooth template per class (Gaussian on a
      4×4 grid, upsampled, zero mean), scaled to L2 norm ``robust_norm`` (default 5, so two
      classes' templates are ~7 apart, far beyond ε=0.5). The template class ``k`` equals the
      label y with probability 1 − ``robust_flip_prob`` and is another class otherwise, so
      robust features alone are deliberately *not* fully predictive (Bayes accuracy ≈ 1 − p).
      ``a`` ~ U(0.75, 1.25) varies the contrast per image.
    - ``n[y]``: the **non-robust feature**. One fixed high-frequency texture per class: a random
      3×t×t tile (``tile``, default 2) repeated over the image, zero-mean over the whole tile and
      orthonormal across classes, scaled to L2 norm ``nonrobust_norm`` (default 0.1, well below
      ε=0.25). The mean is taken over channels and pixels together, so each texture keeps a faint
      uniform colour offset (about a fifth of its energy on average; a 3×2×2 tile has too few
      colour-free directions for 10 orthogonal classes).
      It always matches the label, so it is (nearly) perfectly predictive, and an L2 step of
      ‖n[y] − n[t]‖/2 ≈ 0.07 can swap it for another class's.
    - ``ξ``: i.i.d. pixel noise with std ``pixel_noise``.

    Synthetic images are stored as float32 because uint8 rounding (1/255 per pixel) is larger
    than the non-robust texture's per-pixel amplitude (≈0.002). :func:`synthetic_components`
    returns the ground truth (templates and per-image factors) for tests and analyses.

``cifar10``
    torchvision's CIFAR10, downloaded into ``root`` (default ``resources/``).

``imagefolder``
    any directory with ``train/<class>/*`` and ``test/<class>/*`` images (torchvision ImageFolder),
    e.g. the CIFAR-10 JPEG copy. Classes are sorted by name.

Every source takes optional class-balanced, seeded subsets ``n_train`` / ``n_test``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from notbugs import hdf5
from notbugs.sampling import balanced_subset

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


SOURCES = ("synthetic", "cifar10", "imagefolder")


class DataSourceError(RuntimeError):
    """A data source that cannot be read: missing archive, wrong directory layout, ..."""


# --------------------------------------------------------------------------- synthetic

@dataclass(frozen=True)
class SyntheticSpec:
    """The generative parameters: config section ``dataset.synthetic`` (defaults in the schema)."""
    n_classes: int
    robust_norm: float
    robust_flip_prob: float
    nonrobust_norm: float
    background_std: float
    pixel_noise: float
    tile: int
    size: int = 32      # fixed image geometry, not configurable
    channels: int = 3


# Sizes of the synthetic splits when dataset.n_train / n_test are null ("the whole set").
SYNTHETIC_FULL_SIZE = {"train": 5000, "test": 1000}


def _smooth_field(rng: np.random.Generator, n: int, channels: int, grid: int, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    coarse = torch.from_numpy(rng.standard_normal((n, channels, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()


def synthetic_templates(spec: SyntheticSpec, seed: int) -> dict[str, np.ndarray]:
    """The class templates: ``robust`` (C,3,32,32) and ``nonrobust`` (C,3,32,32)."""
    rng = np.random.default_rng([seed, 0xFEA7])
    robust = _smooth_field(rng, spec.n_classes, spec.channels, 4, spec.size)
    robust -= robust.mean(axis=(1, 2, 3), keepdims=True)
    robust *= spec.robust_norm / np.linalg.norm(robust.reshape(spec.n_classes, -1), axis=1).reshape(-1, 1, 1, 1)

    tile_dim = spec.channels * spec.tile * spec.tile
    if spec.n_classes > tile_dim - 1:
        raise ValueError(f"tile {spec.tile} too small for {spec.n_classes} orthogonal textures")
    raw = rng.standard_normal((tile_dim, spec.n_classes))
    raw -= raw.mean(axis=0, keepdims=True)  # zero-mean tiles carry no colour, only texture
    basis, _ = np.linalg.qr(raw)
    tiles = basis.T.reshape(spec.n_classes, spec.channels, spec.tile, spec.tile)
    reps = spec.size // spec.tile
    nonrobust = np.tile(tiles, (1, 1, reps, reps)).astype(np.float32)
    nonrobust *= spec.nonrobust_norm / np.linalg.norm(nonrobust.reshape(spec.n_classes, -1), axis=1).reshape(-1, 1, 1, 1)
    return {"robust": robust.astype(np.float32), "nonrobust": nonrobust}


def synthetic_components(spec: SyntheticSpec, labels: np.ndarray, seed: int, split_seed: int
                         ) -> dict[str, np.ndarray]:
    """Ground truth: the templates of ``seed`` plus every per-image factor of one split."""
    rng = np.random.default_rng([seed, split_seed, 0xDA7A])
    n = len(labels)
    flip = rng.random(n) < spec.robust_flip_prob
    shift = rng.integers(1, spec.n_classes, size=n)
    robust_class = np.where(flip, (labels + shift) % spec.n_classes, labels)
    amplitude = rng.uniform(0.75, 1.25, size=n).astype(np.float32)
    background = spec.background_std * _smooth_field(rng, n, spec.channels, 8, spec.size)
    noise = spec.pixel_noise * rng.standard_normal(background.shape).astype(np.float32)
    return dict(templates=synthetic_templates(spec, seed), robust_class=robust_class,
                amplitude=amplitude, background=background, noise=noise)


def render_synthetic(spec: SyntheticSpec, labels: np.ndarray, comp: Mapping[str, np.ndarray],
                     robust: bool = True, nonrobust: bool = True) -> np.ndarray:
    """Compose images from components; switch either feature off to build probes."""
    t = comp["templates"]
    x = 0.5 + comp["background"] + comp["noise"]
    if robust:
        x = x + comp["amplitude"].reshape(-1, 1, 1, 1) * t["robust"][comp["robust_class"]]
    if nonrobust:
        x = x + t["nonrobust"][labels]
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def make_synthetic(spec: SyntheticSpec, n: int, seed: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced images; ``seed`` fixes the templates, ``split_seed`` the draws."""
    labels = np.arange(n) % spec.n_classes
    labels = np.random.default_rng([seed, split_seed]).permutation(labels).astype(np.int64)
    comp = synthetic_components(spec, labels, seed, split_seed)
    return render_synthetic(spec, labels, comp), labels


# --------------------------------------------------------------------------- natural data

def split_indices(labels: np.ndarray, n_train: int | None, n_val: int, n_classes: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of a training pool: a class-balanced validation subset of ``n_val``
    rows first, then a class-balanced training subset of ``n_train`` (all if None) from the rest.
    With ``n_val`` = 0 the training subset is the one earlier versions drew."""
    val = balanced_subset(labels, n_val, n_classes, seed + 3) if n_val else np.arange(0)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    if n_val and n_train is not None and n_train > len(rest):
        raise ValueError(f"n_train {n_train} + n_val {n_val} exceed the {len(labels)} training images")
    train = rest[balanced_subset(labels[rest], n_train, n_classes, seed + 1)]
    return train, val


def _to_uint8_array(dataset, indices: np.ndarray, desc: str) -> np.ndarray:
    from tqdm import tqdm
    out = None
    for row, i in enumerate(tqdm(indices, desc=desc, unit="img", mininterval=2)):
        img = np.asarray(dataset[int(i)][0].convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        if out is None:
            out = np.empty((len(indices),) + img.shape, dtype=np.uint8)
        elif img.shape != out.shape[1:]:
            raise DataSourceError(f"{desc}: image {i} has shape {img.shape}, expected {out.shape[1:]}")
        out[row] = img
    if out is None:
        raise DataSourceError(f"{desc}: no images")
    return out


def load_imagefolder(root: str | Path, n_train: int | None, n_test: int | None, seed: int, *, n_val: int):
    from torchvision.datasets import ImageFolder
    root = Path(root)
    splits, classes = {}, None
    for split, n, offset in (("train", n_train, 1), ("test", n_test, 2)):
        folder = root / split
        if not folder.is_dir():
            raise DataSourceError(f"imagefolder: {folder} does not exist; expected {root}/train/<class>/* "
                                  f"and {root}/test/<class>/*")
        try:
            ds = ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataSourceError(f"imagefolder: cannot read {folder}: {exc}") from exc
        if classes is None:
            classes = ds.classes
        elif ds.classes != classes:
            raise DataSourceError(f"imagefolder: classes differ between train {classes} and test {ds.classes}")
        labels = np.asarray(ds.targets, dtype=np.int64)
        if split == "train":
            idx, val = split_indices(labels, n, n_val, len(classes), seed)
            if len(val):
                splits["val"] = {"images": _to_uint8_array(ds, val, "val images"), "labels": labels[val]}
        else:
            idx = balanced_subset(labels, n, len(classes), seed + offset)
        splits[split] = {"images": _to_uint8_array(ds, idx, f"{split} images"), "labels": labels[idx]}
    return splits, classes


def load_cifar10(root: str | Path, n_train: int | None, n_test: int | None, seed: int, *, n_val: int,
                 download: bool = True):
    from torchvision.datasets import CIFAR10
    root = Path(root)
    splits = {}
    for split, n, offset in (("train", n_train, 1), ("test", n_test, 2)):
        try:
            ds = CIFAR10(str(root), train=(split == "train"), download=download)
        except Exception as exc:  # URLError, RuntimeError "Dataset not found", socket errors
            raise DataSourceError(
                f"cifar10: the dataset is not in {root} and could not be downloaded ({exc}). "
                f"Put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) into {root}/, "
                f"or work offline with dataset.source: imagefolder (for example the unpacked "
                f"CIFAR-10 JPEG copy) or dataset.source: synthetic.") from exc
        labels = np.asarray(ds.targets, dtype=np.int64)
        if split == "train":
            idx, val = split_indices(labels, n, n_val, 10, seed)
            if len(val):
                splits["val"] = {"images": np.ascontiguousarray(ds.data[val].transpose(0, 3, 1, 2)),
                                 "labels": labels[val]}
        else:
            idx = balanced_subset(labels, n, 10, seed + offset)
        splits[split] = {"images": np.ascontiguousarray(ds.data[idx].transpose(0, 3, 1, 2)),
                         "labels": labels[idx]}
    return splits, list(ds.classes)


# --------------------------------------------------------------------------- the stage

def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


def prepare(dataset_cfg: Mapping, seed: int, output: str | Path) -> Path:
    """Build the data artifact described by the ``dataset`` config section."""
    source = dataset_cfg["source"]
    if source not in SOURCES:
        raise DataSourceError(f"unknown dataset.source {source!r}; expected one of {SOURCES}")
    n_train, n_test, n_val = dataset_cfg["n_train"], dataset_cfg["n_test"], dataset_cfg["n_val"]
    if source == "synthetic":
        spec = SyntheticSpec(**dataset_cfg["synthetic"])
        splits = {}
        sizes = (("train", n_train or SYNTHETIC_FULL_SIZE["train"], 1),
                 ("test", n_test or SYNTHETIC_FULL_SIZE["test"], 2), ("val", n_val, 3))
        for split, n, split_seed in sizes:
            if n:
                images, labels = make_synthetic(spec, n, seed, split_seed)
                splits[split] = {"images": images, "labels": labels}
        classes = [f"class{c}" for c in range(spec.n_classes)]
        description = f"synthetic planted features {asdict(spec)}"
    elif source == "cifar10":
        splits, classes = load_cifar10(dataset_cfg["root"], n_train, n_test, seed, n_val=n_val)
        description = f"torchvision CIFAR10 from {dataset_cfg['root']}"
    else:  # imagefolder
        splits, classes = load_imagefolder(dataset_cfg["root"], n_train, n_test, seed, n_val=n_val)
        description = f"ImageFolder {Path(dataset_cfg['root']).resolve()}"
    mean, std = channel_stats(splits["train"]["images"])
    log.info("%s: %d train / %d val / %d test images, %d classes", description, len(splits["train"]["labels"]),
             len(splits["val"]["labels"]) if "val" in splits else 0, len(splits["test"]["labels"]), len(classes))
    return hdf5.write_artifact(output, kind="data", splits=splits, class_names=classes,
                               config=dict(dataset_cfg), seed=seed, source=description,
                               extra_attrs={"mean": mean, "std": std})
