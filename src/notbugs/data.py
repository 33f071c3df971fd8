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

``restricted_imagenet``
    Restricted ImageNet (Tsipras et al. 2019; the second dataset of Ilyas et al. 2019): the
    ImageNet-1k classes grouped into 9 super-classes by inclusive ranges of ImageNet class
    indices (:data:`RESTRICTED_IMAGENET_RANGES`); every other class is dropped. Reads an ImageNet
    tree ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the validation set arranged
    by class; it becomes the ``test`` split). A wnid's index is its position in the sorted list of
    the 1000 ImageNet-1k wnids, taken from ``timm`` (a dependency of notbugs), so a tree
    holding only some classes is labelled correctly. Each image is decoded with PIL, converted to
    RGB (ImageNet has greyscale and CMYK JPEGs), its shorter side resized to
    ``dataset.restricted_imagenet.resize`` (antialiased bilinear) and centre-cropped to
    ``resolution`` (the standard ImageNet test transform), and stored as uint8. Every split has an
    extra column ``imagenet_index``. The data does not fit in memory (≈38 GB for the full train
    split at 224 px), so it is streamed to the file a chunk at a time
    (:class:`notbugs.hdf5.ArtifactWriter`) with running channel statistics. An unreadable or
    corrupt image file stops the stage with an error naming it: nothing is skipped silently, so
    the data set is exactly the tree's images (and the file never appears half-written). A job
    killed midway (SIGKILL, a time limit) continues after its last written chunk when rerun.

Every source takes optional class-balanced, seeded subsets ``n_train`` / ``n_test`` and holds a
class-balanced validation split of ``n_val`` images out of the training pool (:func:`split_indices`;
an independent draw for synthetic data). ``n_extra_train`` more class-balanced images of the pool
(never the train or val subsets) form the split ``extra_train``: sources with
``use_extra_train: true`` add it to their training set, so they can be trained on far more
images than the constructions perturb (the paper trains its sources on the whole training set).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from notbugs import hdf5
from notbugs.runtime import partial_path
from notbugs.sampling import balanced_subset

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


SOURCES = ("synthetic", "cifar10", "imagefolder", "restricted_imagenet")


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

def split_indices(labels: np.ndarray, n_train: int | None, n_val: int, n_classes: int, seed: int,
                  n_extra_train: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, val rows, extra_train rows) of a training pool: a class-balanced validation
    subset of ``n_val`` rows first, then a class-balanced training subset of ``n_train`` (all if
    None) from the rest, then ``n_extra_train`` class-balanced rows from what is left (the images
    only sources may add to their training set). With ``n_val`` = 0 the training subset is the
    one earlier versions drew, and the extra rows never change the other two."""
    val = balanced_subset(labels, n_val, n_classes, seed + 3) if n_val else np.arange(0)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    if n_val and n_train is not None and n_train > len(rest):
        raise ValueError(f"n_train {n_train} + n_val {n_val} exceed the {len(labels)} training images")
    train = rest[balanced_subset(labels[rest], n_train, n_classes, seed + 1)]
    if not n_extra_train:
        return train, val, np.arange(0)
    left = np.setdiff1d(rest, train)
    if n_extra_train > len(left):
        raise ValueError(f"n_extra_train {n_extra_train} exceeds the {len(left)} training images outside the "
                         f"train ({len(train)}) and val ({len(val)}) subsets")
    return train, val, left[balanced_subset(labels[left], n_extra_train, n_classes, seed + 4)]


def _pool_rows(labels: np.ndarray, n_train: int | None, n_val: int, n_classes: int, seed: int, n_extra_train: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return split_indices(labels, n_train, n_val, n_classes, seed, n_extra_train)
    except ValueError as exc:
        raise DataSourceError(f"cannot split the {len(labels)} training images: {exc}") from exc


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


def load_imagefolder(root: str | Path, n_train: int | None, n_test: int | None, seed: int, *, n_val: int,
                     n_extra_train: int = 0):
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
            idx, val, extra = _pool_rows(labels, n, n_val, len(classes), seed, n_extra_train)
            for name, rows in (("val", val), ("extra_train", extra)):
                if len(rows):
                    splits[name] = {"images": _to_uint8_array(ds, rows, f"{name} images"), "labels": labels[rows]}
        else:
            idx = balanced_subset(labels, n, len(classes), seed + offset)
        splits[split] = {"images": _to_uint8_array(ds, idx, f"{split} images"), "labels": labels[idx]}
    return splits, classes


def load_cifar10(root: str | Path, n_train: int | None, n_test: int | None, seed: int, *, n_val: int,
                 n_extra_train: int = 0, download: bool = True):
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
            idx, val, extra = _pool_rows(labels, n, n_val, 10, seed, n_extra_train)
            for name, rows in (("val", val), ("extra_train", extra)):
                if len(rows):
                    splits[name] = {"images": np.ascontiguousarray(ds.data[rows].transpose(0, 3, 1, 2)),
                                    "labels": labels[rows]}
        else:
            idx = balanced_subset(labels, n, 10, seed + offset)
        splits[split] = {"images": np.ascontiguousarray(ds.data[idx].transpose(0, 3, 1, 2)),
                         "labels": labels[idx]}
    return splits, list(ds.classes)


# --------------------------------------------------------------------------- channel statistics

def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


class RunningChannelStats:
    """Per-channel mean and (population) std of N×C×H×W batches seen one at a time, as
    :func:`channel_stats` gives for their concatenation; uint8 is scaled to [0, 1]. Float64
    throughout, batches merged with Chan et al.'s pairwise update (no E[x²] − E[x]² cancellation)."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, images: np.ndarray) -> None:
        if len(images) == 0:
            return
        x = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3))
        m2 = ((x - mean.reshape(1, -1, 1, 1)) ** 2).sum(axis=(0, 2, 3))
        if self._mean is None:
            self.count, self._mean, self._m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def to_state(self) -> dict:
        """Everything seen so far, as JSON-able values (floats round-trip exactly)."""
        if self._mean is None:
            return {"count": 0}
        return {"count": self.count, "mean": self._mean.tolist(), "m2": self._m2.tolist()}

    @classmethod
    def from_state(cls, state: Mapping | None) -> "RunningChannelStats":
        stats = cls()
        if state and state.get("count"):
            stats.count = int(state["count"])
            stats._mean, stats._m2 = np.asarray(state["mean"]), np.asarray(state["m2"])
        return stats

    def result(self) -> tuple[list[float], list[float]]:
        if self._mean is None:
            raise ValueError("no images seen")
        return self._mean.tolist(), np.sqrt(self._m2 / self.count).tolist()


# --------------------------------------------------------------------------- Restricted ImageNet

# The 9 super-classes of Restricted ImageNet, in label order (0 = dog, ..., 8 = insect), each an
# INCLUSIVE range (first, last) of ImageNet-1k class indices, an index being the position of a
# wnid in the sorted list of the 1000 ImageNet-1k wnids. Source: the authors' library,
# github.com/MadryLab/robustness, robustness/tools/constants.py (RESTRICTED_IMAGNET_RANGES), read
# with robustness/tools/helpers.py (restricted_label_mapping, which includes both ends). 203 wnids
# in all; the super-classes are unbalanced (dog 118 wnids, frog 3).
RESTRICTED_IMAGENET_RANGES: tuple[tuple[str, int, int], ...] = (
    ("dog", 151, 268),
    ("cat", 281, 285),
    ("frog", 30, 32),
    ("turtle", 33, 37),
    ("bird", 80, 100),
    ("primate", 365, 382),
    ("fish", 389, 397),
    ("crab", 118, 121),
    ("insect", 300, 319),
)
RESTRICTED_IMAGENET_CLASSES = [name for name, _, _ in RESTRICTED_IMAGENET_RANGES]
IMAGENET_CLASSES = 1000
# what counts as an image file in a class folder (case-insensitive); anything else is ignored
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
RESTRICTED_IMAGENET_FOLDERS = {"train": "train", "test": "val"}  # our split: the tree's folder


def restricted_imagenet_label(index: int) -> int:
    """The super-class (0..8) of ImageNet-1k class ``index``, or -1 if it lies in no range."""
    for label, (_, first, last) in enumerate(RESTRICTED_IMAGENET_RANGES):
        if first <= index <= last:
            return label
    return -1


def restricted_imagenet_labels() -> np.ndarray:
    """(1000,) int64: the super-class of every ImageNet-1k class index, -1 for dropped classes."""
    return np.array([restricted_imagenet_label(i) for i in range(IMAGENET_CLASSES)], dtype=np.int64)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in sorted order (index = ImageNet class index), from timm."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as exc:
        raise DataSourceError("restricted_imagenet needs the timm package for the list of ImageNet-1k "
                              "class ids; it is a dependency of notbugs: pip install -e .") from exc
    wnids = list(ImageNetInfo().label_names())
    if len(wnids) != IMAGENET_CLASSES or wnids != sorted(wnids):
        raise DataSourceError(f"timm's ImageNet-1k class list has {len(wnids)} entries"
                              f"{'' if wnids == sorted(wnids) else ', not sorted'}; expected the 1000 sorted wnids")
    return wnids


@dataclass
class ImageList:
    """The image files of one split, in row order, with their labels."""
    paths: list[str]
    labels: np.ndarray           # super-class, int64
    imagenet_index: np.ndarray   # ImageNet-1k class index, int64

    def subset(self, rows: np.ndarray) -> "ImageList":
        return ImageList([self.paths[i] for i in rows], self.labels[rows], self.imagenet_index[rows])


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_restricted_imagenet(root: str | Path) -> dict[str, ImageList]:
    """The Restricted ImageNet files of an ImageNet tree: {"train": ..., "test": ...} (``test``
    reads ``root/val``), rows ordered by wnid, then by file name (the data file shuffles the train rows once). Raises DataSourceError for a
    missing folder, a folder name that is not an ImageNet-1k wnid, or a super-class without images."""
    root = Path(root)
    layout = (f"expected an ImageNet tree {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG "
              f"(the validation set arranged by class, one folder per wnid)")
    wnids = imagenet_wnids()
    index_of = {w: i for i, w in enumerate(wnids)}
    superclass = restricted_imagenet_labels()
    out = {}
    for split, name in RESTRICTED_IMAGENET_FOLDERS.items():
        folder = root / name
        if not folder.is_dir():
            raise DataSourceError(f"restricted_imagenet: {folder} does not exist; {layout}")
        with os.scandir(folder) as entries:
            entries = sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith("."))
        dirs = [n for n, is_dir in entries if is_dir]
        unknown = [n for n in dirs if n not in index_of]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataSourceError(f"restricted_imagenet: {folder} has folders that are not ImageNet-1k wnids: "
                                  f"{shown}; {layout}")
        if not dirs and any(_is_image(n) for n, is_dir in entries if not is_dir):
            raise DataSourceError(f"restricted_imagenet: {folder} holds image files but no class folders; "
                                  f"{layout}. ImageNet's validation images come in one folder: sort them "
                                  f"into val/<wnid>/ with the official ground-truth labels")
        paths, labels, indices = [], [], []
        for wnid in dirs:
            index = index_of[wnid]
            label = int(superclass[index])
            if label < 0:
                continue  # a class outside Restricted ImageNet
            with os.scandir(folder / wnid) as files:
                names = sorted(f.name for f in files if _is_image(f.name) and f.is_file())
            paths += [str(folder / wnid / n) for n in names]
            labels += [label] * len(names)
            indices += [index] * len(names)
        labels_arr = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels_arr, minlength=len(RESTRICTED_IMAGENET_CLASSES))
        empty = [c for c in range(len(counts)) if counts[c] == 0]
        if empty:
            missing = ", ".join(f"{RESTRICTED_IMAGENET_CLASSES[c]!r} (ImageNet indices "
                                f"{RESTRICTED_IMAGENET_RANGES[c][1]}-{RESTRICTED_IMAGENET_RANGES[c][2]})"
                                for c in empty)
            raise DataSourceError(f"restricted_imagenet: no images of super-class {missing} in {folder} "
                                  f"(the {split} split); every super-class needs images in both train/ and val/")
        out[split] = ImageList(paths, labels_arr, np.asarray(indices, dtype=np.int64))
    return out


def load_imagenet_image(path: str, resolution: int, resize: int) -> np.ndarray:
    """One image as 3×R×R uint8: RGB, shorter side resized to ``resize`` (antialiased bilinear),
    centre crop of ``resolution`` (torchvision's Resize + CenterCrop). An unreadable or corrupt
    file raises DataSourceError naming it."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    try:
        with Image.open(path) as raw:
            img = raw.convert("RGB")  # decodes; greyscale, CMYK and palette images become RGB
        img = TF.resize(img, resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, resolution)
        arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on broken files
        raise DataSourceError(f"restricted_imagenet: cannot read image {path}: {type(exc).__name__}: {exc}. "
                              "Replace or delete the file (the stage stops rather than skip images)") from exc
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decoded_blocks(paths: Sequence[str], block: int, decode, pool) -> Iterator[list[np.ndarray]]:
    """Decoded images in blocks of ``block``; with a pool, the next block decodes while the caller
    writes this one (at most two blocks in memory)."""
    starts = range(0, len(paths), block)
    if pool is None:
        for lo in starts:
            yield [decode(p) for p in paths[lo:lo + block]]
        return
    pending = None
    for lo in starts:
        if pending is None:
            pending = pool.map_async(decode, paths[lo:lo + block], chunksize=1)
        ready = pending.get()
        nxt = lo + block
        pending = pool.map_async(decode, paths[nxt:nxt + block], chunksize=1) if nxt < len(paths) else None
        yield ready


def _subset(what: str, labels: np.ndarray, pick) -> np.ndarray:
    try:
        return pick()
    except ValueError as exc:
        counts = ", ".join(f"{name} {n}" for name, n in
                           zip(RESTRICTED_IMAGENET_CLASSES, np.bincount(labels, minlength=len(RESTRICTED_IMAGENET_CLASSES))))
        raise DataSourceError(f"restricted_imagenet: cannot draw the {what}: {exc}. Subsets are class-balanced, "
                              f"n/9 images per super-class; the tree has {counts}") from exc


def prepare_restricted_imagenet(dataset_cfg: Mapping, seed: int, output: str | Path, *, workers: int = 1) -> Path:
    """Stream the Restricted ImageNet data artifact to ``output`` (atomic; see the module docstring).
    ``workers`` > 1 decodes images in that many forked processes."""
    from tqdm import tqdm
    settings = dataset_cfg["restricted_imagenet"]
    resolution, resize = int(settings["resolution"]), int(settings["resize"])
    if resize < resolution:
        raise DataSourceError(f"restricted_imagenet: resize {resize} is smaller than resolution {resolution}; the "
                              "shorter side is resized to `resize` before a centre crop of `resolution`, so "
                              "dataset.restricted_imagenet.resize must be >= resolution")
    root = Path(dataset_cfg["root"])
    n_train, n_test, n_val = dataset_cfg["n_train"], dataset_cfg["n_test"], dataset_cfg["n_val"]
    n_classes = len(RESTRICTED_IMAGENET_CLASSES)
    found = scan_restricted_imagenet(root)
    pool_labels = found["train"].labels
    train_rows, val_rows = _subset(f"train split of {n_train} (+ {n_val} validation) images", pool_labels,
                                   lambda: split_indices(pool_labels, n_train, n_val, n_classes, seed)[:2])
    test_rows = _subset(f"test split of {n_test} images", found["test"].labels,
                        lambda: balanced_subset(found["test"].labels, n_test, n_classes, seed + 2))
    # The file's train rows in a seeded random order, not by wnid: a streamed epoch shuffles whole
    # HDF5 chunks, and a chunk of one wnid would put a single class in each chunk.
    train_rows = np.random.default_rng([seed, 0x5EED]).permutation(train_rows)
    splits = {"train": found["train"].subset(train_rows), "test": found["test"].subset(test_rows)}
    if len(val_rows):
        splits["val"] = found["train"].subset(val_rows)
    columns = {"images": hdf5.ColumnSpec((3, resolution, resolution), "uint8"),
               "labels": hdf5.ColumnSpec((), "int64"),
               "imagenet_index": hdf5.ColumnSpec((), "int64")}
    wnids = len(set(found["train"].imagenet_index.tolist()))
    description = (f"Restricted ImageNet, {wnids} wnids in {n_classes} super-classes, from {root.resolve()}: "
                   f"shorter side resized to {resize}, centre crop {resolution}")
    log.info("%s: %s images", description, " / ".join(f"{len(v.paths)} {k}" for k, v in splits.items()))
    decode = functools.partial(load_imagenet_image, resolution=resolution, resize=resize)
    # A killed run's partial file is continued only if it was made from the same settings and files.
    fingerprint = json.dumps({"config": dict(dataset_cfg), "seed": seed, "files": {
        split: hashlib.sha256("\n".join(items.paths).encode()).hexdigest() for split, items in splits.items()}},
        sort_keys=True, default=str)
    pool = None
    if workers > 1:
        import multiprocessing
        # fork: the workers need nothing but this module, and spawn would re-run a script's top level
        pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        with hdf5.ArtifactWriter(output, "data", {k: len(v.paths) for k, v in splits.items()}, columns,
                                 fingerprint=fingerprint) as writer:
            stats = RunningChannelStats.from_state(writer.state)
            if any(writer.rows_done.values()):
                log.info("continuing %s: %s rows already written", partial_path(output),
                         ", ".join(f"{s} {n}" for s, n in writer.rows_done.items()))
            block = writer.chunk_rows("images")
            for split, items in splits.items():
                lo = writer.rows_done[split]
                with tqdm(total=len(items.paths), initial=lo, desc=f"{split} images", unit="img",
                          mininterval=2) as bar:
                    for images in _decoded_blocks(items.paths[lo:], block, decode, pool):
                        hi = lo + len(images)
                        batch = np.stack(images)
                        if split == "train":
                            stats.update(batch)
                        writer.append(split, {"images": batch, "labels": items.labels[lo:hi],
                                              "imagenet_index": items.imagenet_index[lo:hi]},
                                      state=stats.to_state())
                        bar.update(len(images))
                        lo = hi
            mean, std = stats.result()
            return writer.finish(class_names=RESTRICTED_IMAGENET_CLASSES, config=dict(dataset_cfg), seed=seed,
                                 source=description,
                                 extra_attrs={"mean": mean, "std": std,
                                              "superclass_ranges": {name: [first, last] for name, first, last
                                                                    in RESTRICTED_IMAGENET_RANGES}})
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


# --------------------------------------------------------------------------- the stage


def prepare(dataset_cfg: Mapping, seed: int, output: str | Path, *, workers: int = 1) -> Path:
    """Build the data artifact described by the ``dataset`` config section. ``workers`` is the
    number of processes that decode images (used by ``restricted_imagenet``; 1 = this process)."""
    source = dataset_cfg["source"]
    if source not in SOURCES:
        raise DataSourceError(f"unknown dataset.source {source!r}; expected one of {SOURCES}")
    if source == "restricted_imagenet":  # streamed: never the whole data set in memory
        return prepare_restricted_imagenet(dataset_cfg, seed, output, workers=workers)
    n_train, n_test, n_val = dataset_cfg["n_train"], dataset_cfg["n_test"], dataset_cfg["n_val"]
    if source == "synthetic":
        spec = SyntheticSpec(**dataset_cfg["synthetic"])
        splits = {}
        sizes = (("train", n_train or SYNTHETIC_FULL_SIZE["train"], 1),
                 ("test", n_test or SYNTHETIC_FULL_SIZE["test"], 2), ("val", n_val, 3),
                 ("extra_train", dataset_cfg.get("n_extra_train", 0), 4))
        for split, n, split_seed in sizes:
            if n:
                images, labels = make_synthetic(spec, n, seed, split_seed)
                splits[split] = {"images": images, "labels": labels}
        classes = [f"class{c}" for c in range(spec.n_classes)]
        description = f"synthetic planted features {asdict(spec)}"
    elif source == "cifar10":
        splits, classes = load_cifar10(dataset_cfg["root"], n_train, n_test, seed, n_val=n_val,
                                       n_extra_train=dataset_cfg.get("n_extra_train", 0))
        description = f"torchvision CIFAR10 from {dataset_cfg['root']}"
    else:  # imagefolder
        splits, classes = load_imagefolder(dataset_cfg["root"], n_train, n_test, seed, n_val=n_val,
                                           n_extra_train=dataset_cfg.get("n_extra_train", 0))
        description = f"ImageFolder {Path(dataset_cfg['root']).resolve()}"
    mean, std = channel_stats(splits["train"]["images"])
    log.info("%s: %d train / %d val / %d test / %d extra_train (sources only) images, %d classes", description,
             *(len(splits[name]["labels"]) if name in splits else 0 for name in ("train", "val", "test", "extra_train")),
             len(classes))
    return hdf5.write_artifact(output, kind="data", splits=splits, class_names=classes,
                               config=dict(dataset_cfg), seed=seed, source=description,
                               extra_attrs={"mean": mean, "std": std})
